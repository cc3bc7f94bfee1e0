"""Lab file formats into tables, the simulator, and the tables -> graph builder (:mod:`jaxfood.data.build`)."""
