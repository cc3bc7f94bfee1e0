"""jaxfood.train"""
