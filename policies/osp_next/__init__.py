"""OSP-Next: the Wan2.1 T2V DiT with per-block full / Skiparse-2D (token, group) attention."""

from policies.osp_next.config import OSPNextConfig
from policies.osp_next.layout import SequencePlan, SparseGeometry
from policies.osp_next.model import OSPNext

__all__ = ["OSPNext", "OSPNextConfig", "SequencePlan", "SparseGeometry"]
