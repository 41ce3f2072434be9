"""SPHERE: hyperspherical energy of weights and the projection that keeps updates off their principal directions."""

from .hyperspherical import hyperspherical_energy, principal_directions, sphere_project
from .projection import SphereProjection

__all__ = ["SphereProjection", "hyperspherical_energy", "principal_directions", "sphere_project"]
