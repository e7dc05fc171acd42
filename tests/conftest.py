import pytest
import torch

from tests import tiny


@pytest.fixture(scope="session")
def bl_tok():
    return tiny.byte_level_tokenizer()


@pytest.fixture(scope="session")
def sp_tok():
    return tiny.sentencepiece_tokenizer()


@pytest.fixture(scope="session")
def tiny_fp32_cache(tmp_path_factory, tiny_teacher_dir) -> str:
    """An fp32 cache of tiny.RECORDS from the tiny teacher, extracted one sample per batch (so its states are
    bitwise those of a single-sample forward), layers 2, 3, 4, shards of 5."""
    from mta_cli.extraction import ExtractConfig, extract

    base = tmp_path_factory.mktemp("fp32-cache")
    data = base / "records.jsonl"
    tiny.write_jsonl(data, tiny.RECORDS)
    out = base / "cache.zarr"
    extract(ExtractConfig(teacher=str(tiny_teacher_dir), data=str(data), out=str(out), dtype="fp32", batch_size=1,
                          shard_size=5, device="cpu", max_length=64, max_prompt_length=32))
    return str(out)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, bl_tok):
    """A 4-layer random Llama with the byte-level tokenizer, saved as an HF folder."""
    return tiny.save_tiny_model(tmp_path_factory.mktemp("teacher"), bl_tok, tiny.tiny_llama(bl_tok))


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and lose a lot when the CPU is shared (results do not change)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
