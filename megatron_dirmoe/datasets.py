"""Training data for `megatron_dirmoe.pretrain`: Megatron's `GPTDataset` (or `MockGPTDataset`)
built through `BlendedMegatronDatasetBuilder` from the usual Megatron data arguments
(``--data-path`` blends with ``--split``, or ``--train/valid/test-data-path``).

:func:`train_valid_test_datasets_provider` has the signature `megatron.training.pretrain`
expects; the CPU loop calls it too, so both paths read exactly the same samples.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import Optional, Sequence

__all__ = ["gpt_dataset_config_from_args", "build_gpt_datasets", "index_build_lock",
           "num_samples_per_split", "train_valid_test_datasets_provider"]


def gpt_dataset_config_from_args(args: argparse.Namespace, tokenizer, *,
                                 create_attention_mask: Optional[bool] = None):
    """`GPTDatasetConfig` from Megatron's arguments (what Megatron-LM's pretrain_gpt does)."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.training.utils.common_utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    if create_attention_mask is None:
        create_attention_mask = args.create_attention_mask_in_dataloader
    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split if blend is not None else None,
        num_dataset_builder_threads=args.num_dataset_builder_threads,
        path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files,
        tokenizer=tokenizer,
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=create_attention_mask,
        object_storage_cache_path=getattr(args, "object_storage_cache_path", None),
        mid_level_dataset_surplus=args.mid_level_dataset_surplus,
        allow_ambiguous_pad_tokens=args.allow_ambiguous_pad_tokens,
    )


def num_samples_per_split(args: argparse.Namespace) -> list[int]:
    """Samples the run draws from train/valid/test (Megatron's own formula, iteration-based)."""
    train = args.train_iters * args.global_batch_size
    eval_gbs = getattr(args, "eval_global_batch_size", None) or args.global_batch_size
    evals = (args.train_iters // args.eval_interval + 1) if args.eval_interval else 0
    valid = evals * args.eval_iters * eval_gbs
    test = args.eval_iters * eval_gbs
    return [train, valid, test]


def build_gpt_datasets(args: argparse.Namespace, tokenizer, sizes: Sequence[int], *,
                       is_built_on_rank=lambda: True, create_attention_mask=None):
    """(train, valid, test) datasets; a split without data is ``None``."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset

    from megatron_dirmoe.errors import raised_under, restate

    # Missing files are found at start-up (training/inputs.py); what is left is a file Megatron
    # cannot read (a damaged or foreign .idx/.bin, a bad --split): name the data flags.
    with restate(f"reading the training data ({_data_flags_text(args)})",
                 "check that every prefix is a .bin/.idx pair written by dirmoe-preprocess (or "
                 "Megatron's preprocess_data.py) and not cut short; preprocess it again if not",
                 catch=(AssertionError, ValueError, OSError, EOFError, IndexError),
                 raised_in=raised_under("/megatron/core/datasets/", "/numpy/")):
        config = gpt_dataset_config_from_args(args, tokenizer,
                                              create_attention_mask=create_attention_mask)
        cls = MockGPTDataset if args.mock_data else GPTDataset
        with index_build_lock(config):
            return BlendedMegatronDatasetBuilder(cls, list(sizes), is_built_on_rank,
                                                 config).build()


@contextlib.contextmanager
def index_build_lock(config):
    """Serialise the building of Megatron's dataset index cache between independent
    one-process jobs that share it (several runs of a comparison, two experiments on one data
    prefix): Megatron writes the cached .npy indices in place and coordinates only the ranks of
    one job, so a second job could read a half-written index ("EOFError: No data left in
    file"). An exclusive `flock` on a file next to the cache of `config` (a
    `GPTDatasetConfig`); nothing in a multi-rank job (rank 0 builds behind Megatron's own
    barrier, and a lock held across it would deadlock), for mock data, or where the folder is
    not writable."""
    import torch.distributed as dist

    folder = _index_cache_folder(config)
    if folder is None or (dist.is_available() and dist.is_initialized()
                          and dist.get_world_size() > 1):
        yield
        return
    try:
        import fcntl

        handle = open(os.path.join(folder, INDEX_LOCK_NAME), "a")
    except (ImportError, OSError):  # not POSIX, or a read-only data folder
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


INDEX_LOCK_NAME = ".dirmoe-dataset-index.lock"


def _index_cache_folder(config) -> Optional[str]:
    """Where Megatron caches the dataset indices: the config's `path_to_cache`, or the folder
    of its first data prefix (Megatron's default); None without prefixes (mock data)."""
    if config.path_to_cache:
        return config.path_to_cache
    blends = [config.blend] if config.blend else list(config.blend_per_split or [])
    for blend in blends:
        if blend and blend[0]:
            return os.path.dirname(os.path.abspath(blend[0][0]))
    return None


def _data_flags_text(args: argparse.Namespace) -> str:
    if getattr(args, "dirmoe_embedded_corpus", False):
        return "the shipped corpus, tokenised under --dirmoe-data-cache / <--save>/data"
    parts = []
    for name in ("data_path", "train_data_path", "valid_data_path", "test_data_path",
                 "data_args_path", "per_split_data_args_path", "split"):
        value = getattr(args, name, None)
        if value and not (name == "split" and not getattr(args, "data_path", None)):
            text = " ".join(value) if isinstance(value, (list, tuple)) else str(value)
            parts.append(f"--{name.replace('_', '-')} {text}")
    return "; ".join(parts) or "--mock-data"


def _mtp_on_this_stage(args: argparse.Namespace, vp_stage=None) -> bool:
    """Whether this pipeline stage holds multi-token-prediction layers (they need the labels)."""
    if not getattr(args, "mtp_num_layers", None):
        return False
    from megatron.core.transformer.multi_token_prediction import mtp_on_this_rank
    from megatron.training.arguments import core_transformer_config_from_args

    config = core_transformer_config_from_args(args)  # parses --pipeline-model-parallel-layout
    return mtp_on_this_rank(layout=config.pipeline_model_parallel_layout,
                            mtp_num_layers=config.mtp_num_layers, ignore_virtual=False,
                            vp_stage=vp_stage)


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """`megatron.training.pretrain`'s dataset provider (reads Megatron's global args).

    Called on every rank (``is_distributed``): `BlendedMegatronDatasetBuilder` synchronises all
    ranks while rank 0 writes the index caches, and builds datasets only where data is read, as
    Megatron-LM's pretrain_gpt does: tensor-parallel rank 0 of the first and last pipeline stages
    (and of a stage holding MTP layers). Elsewhere the splits are None, so
    `megatron.training` gives those ranks no data iterator and
    `megatron_dirmoe.training.gpu.get_batch` receives their batches by broadcast (TP ranks > 0)
    or needs none (middle stages).
    """
    from megatron.core import mpu
    from megatron.training import get_args, get_tokenizer, print_rank_0
    from megatron.training.utils import is_first_or_last_pipeline_stage

    args = get_args()

    def is_built_on_rank():
        return mpu.get_tensor_model_parallel_rank() == 0 and (
            is_first_or_last_pipeline_stage(vp_stage) or _mtp_on_this_stage(args, vp_stage)
        )

    print_rank_0("> building train, validation, and test datasets for DirMoE GPT ...")
    datasets = build_gpt_datasets(args, get_tokenizer(), train_val_test_num_samples,
                                  is_built_on_rank=is_built_on_rank)
    print_rank_0("> finished creating DirMoE GPT datasets ...")
    return datasets


# `megatron.training` calls a provider marked distributed on every rank, not only on TP rank 0:
# the dataset builder's barriers need every rank (otherwise TP > 1 waits forever).
train_valid_test_datasets_provider.is_distributed = True
