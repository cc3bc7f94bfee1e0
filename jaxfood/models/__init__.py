"""jaxfood.models"""
