"""End-to-end checks of the shipped en-de model (marked slow; cheap enough for CI)."""

import subprocess
import sys

import pytest

from core import checkpoint
from core.translator import Translator

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def translator():
    return Translator.load(device="cpu")


def test_default_model_is_installed_and_small():
    path = checkpoint.resolve(None)
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size <= 40e6, f"{path} holds {size / 1e6:.1f} MB"
    assert (path / "MODEL_CARD.md").is_file()


def test_translates_everyday_and_caption_sentences(translator):
    out = translator.translate(["A man is riding a bicycle.", "Two dogs play in the snow.",
                                "Where is the train station?"], strategy="beam", beam_size=4)
    assert "Mann" in out[0] and "Fahrrad" in out[0]
    assert "Hunde" in out[1] and "Schnee" in out[1]
    assert "Bahnhof" in out[2]


def test_cli_with_no_flags():
    result = subprocess.run([sys.executable, "-m", "cli.main"], input="A man is riding a bicycle.\n",
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Fahrrad" in result.stdout and result.stdout.count("\n") == 1
