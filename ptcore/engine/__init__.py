"""ptcore's inference engine for test-time compute: :class:`Engine` (paged KV cache, radix prefix
reuse, batched prefill and decode, forks, rollback), :class:`SamplingParams`, :class:`Completion`."""
from ptcore.engine.engine import Engine
from ptcore.engine.model import SUPPORTED_MODEL_TYPES, CompactModel
from ptcore.engine.results import Completion, EngineStats, Recording
from ptcore.engine.sampling import SamplingParams, sample
from ptcore.engine.sequences import EngineSeq
from ptcore.engine.tree import TokenTrie

__all__ = ["CompactModel", "Completion", "Engine", "EngineSeq", "EngineStats", "Recording", "SUPPORTED_MODEL_TYPES",
           "SamplingParams", "TokenTrie", "sample"]
