"""sgl_ray.actors."""
