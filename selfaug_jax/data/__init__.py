"""Data pipeline: schema -> readers -> prompts (exact label masks, length policy) -> tfds store -> batches.

Typical use::

    from selfaug_jax import data
    examples = list(data.read_crag_task1(path, split="validation", document_source="page"))
    tokenized, stats = data.tokenize_examples(examples, tokenizer, data.PromptConfig(max_length=2048))
    ds_dir = data.write_tfds_dataset({"train": tokenized}, data_dir, name="crag")
    sampler = data.EpochSampler(data.load_tfds_source(ds_dir, "train"), seed=0)
    batches = data.BatchIterator(sampler, data.BatchConfig(batch_size=8, buckets=(512, 1024, 2048)))
    state = batches.state            # JSON-able; batches.set_state(state) resumes exactly
"""

from selfaug_jax.data.batching import (
    Batch,
    BatchConfig,
    BatchIterator,
    BatchStats,
    bucket_length,
    iter_batches,
    pack_batch,
    pad_batch,
)
from selfaug_jax.data.prompts import (
    DocumentsTemplate,
    PlainTemplate,
    PromptConfig,
    PromptError,
    PromptStats,
    build_chat,
    render_documents_block,
    tokenize_example,
    tokenize_examples,
)
from selfaug_jax.data.readers import (
    CRAG_SPLITS,
    ReaderStats,
    html_to_text,
    iter_json_array_records,
    iter_jsonl_records,
    open_text,
    read_crag_task1,
    read_examples,
    read_jsonl,
    read_rag_instruct,
    write_jsonl,
)
from selfaug_jax.data.schema import (
    IGNORE_INDEX,
    DataFormatError,
    Document,
    Message,
    RagExample,
    SchemaError,
    TokenizedExample,
)
from selfaug_jax.data.tfds_source import (
    BUILDER_NAME,
    EpochSampler,
    TokenizedRagBuilder,
    TokenizedSource,
    load_tfds_source,
    write_tfds_dataset,
)

__all__ = [
    # schema
    "IGNORE_INDEX", "DataFormatError", "SchemaError", "Document", "Message", "RagExample", "TokenizedExample",
    # prompts
    "DocumentsTemplate", "PlainTemplate", "PromptConfig", "PromptError", "PromptStats", "build_chat",
    "render_documents_block", "tokenize_example", "tokenize_examples",
    # readers
    "CRAG_SPLITS", "ReaderStats", "html_to_text", "iter_json_array_records", "iter_jsonl_records", "open_text",
    "read_crag_task1", "read_examples", "read_jsonl", "read_rag_instruct", "write_jsonl",
    # tfds
    "BUILDER_NAME", "EpochSampler", "TokenizedRagBuilder", "TokenizedSource", "load_tfds_source",
    "write_tfds_dataset",
    # batching
    "Batch", "BatchConfig", "BatchIterator", "BatchStats", "bucket_length", "iter_batches", "pack_batch",
    "pad_batch",
]
