"""jaxfood.data"""
