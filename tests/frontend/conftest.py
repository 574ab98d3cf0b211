"""Local fixtures of the frontend tests: the harmony encoding (offline vocabulary)."""
import pytest

from frontend_svc.harmony_parse import HarmonySpecials
from gptoss_engine.vocab import harmony_encoding


@pytest.fixture(scope="session")
def enc():
    return harmony_encoding()


@pytest.fixture(scope="session")
def specials(enc):
    return HarmonySpecials.from_encoding(enc)
