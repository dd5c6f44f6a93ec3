"""Encoders that are not in timm: the 3D encoders (``cemnet3d_*``) used by MGMR 3D."""

from cemnet.models.encoder3d import ARCHS, Encoder3D, build_encoder3d, list_encoders3d

__all__ = ["ARCHS", "Encoder3D", "build_encoder3d", "list_encoders3d"]
