"""Device meshes and the placement of parameters and batches on them."""

from parallel.mesh import AXES, get_default_config, make_mesh, mesh_shape

__all__ = ["AXES", "get_default_config", "make_mesh", "mesh_shape"]
