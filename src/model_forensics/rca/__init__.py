"""Root-cause analysis: Compression Forensics, attribution ranking, CausalCCA fix sets."""

from model_forensics.rca.attribution import Ranking, UnitScore, attribution_ranking
from model_forensics.rca.cca import CausalCCA, FixMember, FixSet
from model_forensics.rca.compression import Anomaly, AnomalyReport, CompressionForensics
from model_forensics.rca.notes import Note
from model_forensics.rca.side_effects import SideEffects

__all__ = [
    "Anomaly",
    "AnomalyReport",
    "CausalCCA",
    "CompressionForensics",
    "FixMember",
    "FixSet",
    "Note",
    "Ranking",
    "SideEffects",
    "UnitScore",
    "attribution_ranking",
]
