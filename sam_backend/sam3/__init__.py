"""SAM 3 concept prompts: a phrase or an exemplar box finds every instance (keras-hub's SAM 3, corrected).

Needs the ``concepts`` extra (the ``tokenizers`` package). Like
:mod:`sam_backend.sam`, it knows nothing of storage, Label Studio or HTTP.
"""

from sam_backend.sam3.engine import ConceptEngine, ConceptResult
from sam_backend.sam3.instances import ConceptInstance, ConceptSettings
from sam_backend.sam3.tokenizer import PhraseError

__all__ = ["ConceptEngine", "ConceptResult", "ConceptInstance", "ConceptSettings", "PhraseError"]
