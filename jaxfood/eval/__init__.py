"""jaxfood.eval"""
