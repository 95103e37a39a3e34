"""sgl_ray.deployments."""
