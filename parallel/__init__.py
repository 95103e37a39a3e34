"""sgl_ray.parallel."""
