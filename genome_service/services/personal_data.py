"""Which events hold a persona's personal data, and which streams may therefore not be snapshotted.

Knowledge titles and chunk texts, chat messages and uploaded training files are sealed with the persona's
data key in the log (``eventstore/sealing.py``) and in the read models
(``projections/sealed_columns.py``). ``services/erasure.py`` shreds that key.
"""

from __future__ import annotations

from genome_service.domain.conversation import CONVERSATION, MessageAdded
from genome_service.domain.knowledge import KNOWLEDGE, KnowledgeAdded
from genome_service.domain.training_file import TRAINING_FILE, FileUploaded
from genome_service.eventstore.sealing import PersonalFields

PERSONAL_FIELDS = (
    PersonalFields(KnowledgeAdded.__struct_config__.tag, texts=("title",), text_lists=("chunks",)),  # type: ignore[arg-type]
    PersonalFields(MessageAdded.__struct_config__.tag, texts=("content",)),  # type: ignore[arg-type]
    # An uploaded file is its own subject: deleting it shreds its key alone.
    PersonalFields(FileUploaded.__struct_config__.tag, texts=("content",), subject_field="file_id"),  # type: ignore[arg-type]
)
PERSONAL_STREAM_TYPES = (KNOWLEDGE.stream_type, CONVERSATION.stream_type, TRAINING_FILE.stream_type)
