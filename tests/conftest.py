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
