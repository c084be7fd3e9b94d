"""Marian (opus-mt) import: parity with transformers' MarianMTModel and MarianTokenizer on tiny
models and SentencePiece models built here; the Hugging Face cache, offline use, and the cache
of converted copies. Nothing here reaches the network."""

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
sentencepiece = pytest.importorskip("sentencepiece")

from typer.testing import CliRunner  # noqa: E402

from conftest import marian_model, train_spm  # noqa: E402

from cli.main import app  # noqa: E402
from core.search import with_defaults as with_model_defaults  # noqa: E402
from core import checkpoint, hub, marian, models, segment  # noqa: E402
from core.errors import ModelError, ModelNotFound, UsageError  # noqa: E402
from core.generate import generate  # noqa: E402
from core.search import BeamSearch, Sampling  # noqa: E402
from core.translator import Translator  # noqa: E402

ENGLISH = [
    "A man is riding a bicycle.", "Two dogs play in the snow.", "Where is the train station?",
    "The children are laughing at the park.", "I would like a cup of coffee, please.",
    "She reads a book every evening.", "The weather is nice today!", "He can't find his keys.",
    "Café au lait costs 3,50 € in Zürich.", "The quick brown fox jumps over the lazy dog.",
    "Numbers: 1, 2, 3, 42 and 1000.", "We met a naïve actor at the café.",
]
GERMAN = [
    "Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee.", "Wo ist der Bahnhof?",
    "Die Kinder lachen im Park.", "Ich hätte gern eine Tasse Kaffee, bitte.",
    "Sie liest jeden Abend ein Buch.", "Das Wetter ist heute schön!", "Er findet seine "
    "Schlüssel nicht.", "Grüße aus Köln, sagte die Frau.", "Äpfel, Öl und Übermut.",
    "Der schnelle braune Fuchs springt über den faulen Hund.", "Zahlen: 1, 2, 3, 42 und 1000.",
]
SAMPLES = [  # plain, accented, CJK, emoji, whitespace-heavy, and Marian's own markup
    "A man is riding a bicycle.",
    "Grüße aus Köln: Äpfel, Öl, Übermut, façade, naïve, ½ ﬁ",
    "日本語のテキストと中文",
    "Emoji 🚲🐕‍🦺 and flags 🇩🇪",
    "  leading and   trailing spaces\tand a tab  \u3000 ",
    "\u00a0non-breaking\u2028line separator",
    ">>fra<< Where is the train station?",
    "a </s> b <unk> c",
    "",
]
LANGUAGES = [">>fra<<", ">>deu<<"]
REPO = "tiny-org/opus-mt-en-de"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
MAX_LENGTH = 24  # ours; Hugging Face counts two more (the start token and EOS)

runner = CliRunner()


def run(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input, prog_name="translate")


@pytest.fixture(scope="module")
def marian_dir(tmp_path_factory) -> Path:
    return marian_model(tmp_path_factory.mktemp("hf") / "opus-mt-en-de", ENGLISH, GERMAN,
                        LANGUAGES, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def hf_model(marian_dir):
    return transformers.MarianMTModel.from_pretrained(marian_dir).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(marian_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Recommended: pip install sacremoses": unused here
        return transformers.MarianTokenizer(
            str(marian_dir / "source.spm"), str(marian_dir / "target.spm"),
            str(marian_dir / "vocab.json"))


@pytest.fixture(scope="module")
def ours(marian_dir):
    return models.load(str(marian_dir), device="cpu")


def batch(ids: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    src = torch.full((len(ids), max(map(len, ids))), pad)
    for i, x in enumerate(ids):
        src[i, : len(x)] = torch.tensor(x)
    return src, src != pad  # (B, S)


def our_search(ckpt, ids, strategy, max_length=MAX_LENGTH):
    src, mask = batch(ids, ckpt.config.pad_id)
    found = {}
    for step in generate(ckpt.model, src, mask, strategy, max_length=max_length):
        found.update(step.finished)
    return [found[i][0] for i in range(len(ids))]


def hf_tokens(sequence: torch.Tensor, eos: int) -> list[int]:
    tokens = sequence.tolist()[1:]  # without the decoder's start token
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


# ---- conversion --------------------------------------------------------------------------

def test_config_and_files(ours, marian_dir):
    cfg, hf = ours.config, json.loads((marian_dir / "config.json").read_text())
    assert (cfg.norm_first, cfg.sinusoid_layout, cfg.scale_embeddings, cfg.tie_output,
            cfg.final_logits_bias, cfg.activation) == (False, "halves", True, True, True, "swish")
    assert (cfg.pad_id, cfg.decoder_start_id, cfg.bos_id, cfg.eos_id) == (
        hf["pad_token_id"], hf["pad_token_id"], hf["pad_token_id"], 0)
    assert (cfg.source_lang, cfg.target_lang) == ("en", "de")  # from the directory's name
    assert ours.generation == {"strategy": "beam", "beam_size": 4, "max_length": MAX_LENGTH}
    names = {p.name for p in ours.path.iterdir()}
    assert {"config.json", "model.safetensors", "source_tokenizer.json",
            "target_tokenizer.json", "generation.json", "origin.json"} <= names
    assert ours.path.is_relative_to(hub.cache_root())


def test_encoder_output_and_logits_match_transformers(ours, hf_model, hf_tokenizer):
    lines = ENGLISH[:4] + SAMPLES[1:4]
    ids = ours.tokenizer.encode_batch(lines)
    src, mask = batch(ids, ours.config.pad_id)
    targets = ours.tokenizer.encode_batch(GERMAN[:len(lines)])  # any ids will do as a prefix
    tgt_in, _ = batch([[ours.config.decoder_start_id] + t[:-1] for t in targets],
                      ours.config.pad_id)
    with torch.no_grad():
        memory = ours.model.encode(src, mask)  # (B, S, D)
        logits = ours.model.decode(tgt_in, memory, mask)  # (B, T, V)
        hf_memory = hf_model.get_encoder()(input_ids=src, attention_mask=mask.long())[0]
        hf_logits = hf_model(input_ids=src, attention_mask=mask.long(),
                             decoder_input_ids=tgt_in).logits
    real = mask[:, :, None]
    encoder_diff = ((memory - hf_memory).abs() * real).max().item()
    logit_diff = (logits - hf_logits).abs().max().item()
    print(f"\nparity: max |encoder diff| {encoder_diff:.2e}, max |logit diff| {logit_diff:.2e}, "
          f"logit scale {hf_logits.abs().max().item():.1f}")
    assert encoder_diff < 1e-4 and logit_diff < 1e-4


def test_greedy_matches_transformers_token_for_token(ours, hf_model):
    ids = ours.tokenizer.encode_batch(ENGLISH + GERMAN)
    src, mask = batch(ids, ours.config.pad_id)
    hyps = our_search(ours, ids, Sampling(eos_id=0, temperature=0.0))
    with torch.no_grad():
        out = hf_model.generate(input_ids=src, attention_mask=mask.long(), num_beams=1,
                                do_sample=False, max_length=MAX_LENGTH + 2,
                                bad_words_ids=[[ours.config.pad_id]])
    expected = [hf_tokens(row, 0) for row in out]
    assert [h.tokens for h in hyps] == expected
    lengths = sorted(len(t) for t in expected)
    print(f"\ngreedy: {len(expected)} hypotheses equal, lengths {lengths}")
    assert lengths[0] < lengths[-1] == MAX_LENGTH  # natural ends, and the forced one


def test_beam_search_matches_transformers(ours, hf_model):
    ids = ours.tokenizer.encode_batch(ENGLISH + GERMAN)
    src, mask = batch(ids, ours.config.pad_id)
    hyps = our_search(ours, ids, BeamSearch(eos_id=0, beam_size=4, max_length=MAX_LENGTH))
    with torch.no_grad():
        out = hf_model.generate(
            input_ids=src, attention_mask=mask.long(), num_beams=4, length_penalty=0.0,
            early_stopping=True, max_length=MAX_LENGTH + 2, renormalize_logits=True,
            bad_words_ids=[[ours.config.pad_id]], output_scores=True,
            return_dict_in_generate=True)
    expected = [hf_tokens(row, 0) for row in out.sequences]
    assert [h.tokens for h in hyps] == expected
    # scores agree where EOS came on its own; a forced EOS costs 0 in transformers but its
    # log-prob in ours
    ended = [i for i, t in enumerate(expected) if len(t) < MAX_LENGTH]
    assert len(ended) > len(expected) // 2
    ours_scores = torch.tensor([hyps[i].score for i in ended])
    assert torch.allclose(ours_scores, out.sequences_scores[ended], atol=1e-4)
    lengths = sorted(len(t) for t in expected)
    print(f"\nbeam: {len(expected)} best hypotheses equal, lengths {lengths}")


def test_translations_match_transformers_text(ours, hf_model, hf_tokenizer, marian_dir):
    # sentences without numbers and the like: a random model drops them, and ours then
    # translates the sentence again with them protected (tests/test_segment.py)
    plain = [s for s in ENGLISH if not any(x.checked for x in segment.split(s, "en"))]
    assert len(plain) >= 8
    translator = Translator.load(str(marian_dir), device="cpu")
    ours_text = translator.translate(plain, strategy="beam", beam_size=4, length_penalty=0.0,
                                     max_length=MAX_LENGTH)
    inputs = hf_tokenizer(plain, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = hf_model.generate(**inputs, num_beams=4, length_penalty=0.0, early_stopping=True,
                                max_length=MAX_LENGTH + 2, renormalize_logits=True,
                                bad_words_ids=[[ours.config.pad_id]])
    assert ours_text == hf_tokenizer.batch_decode(out, skip_special_tokens=True)


# ---- tokenizer ---------------------------------------------------------------------------

@pytest.mark.parametrize("text", SAMPLES)
def test_tokenizer_ids_match_marian_tokenizer(ours, hf_tokenizer, text):
    assert ours.tokenizer.encode(text) == hf_tokenizer(text).input_ids


def test_pieces_outside_the_vocabulary_and_languages(ours, hf_tokenizer):
    tok = ours.tokenizer
    assert tok.encode("🚲")[-2:] == [tok.unk_id, tok.eos_id]
    fra = tok.with_target_language("fra")
    assert fra.encode("Hello") == hf_tokenizer(">>fra<< Hello").input_ids
    assert fra.encode(">>deu<< Hello")[0] == tok.vocab[">>deu<<"]  # the line's own choice wins
    assert tok.prefix == []  # the original is unchanged
    with pytest.raises(UsageError, match="unknown target language 'fre'; did you mean fra"):
        tok.with_target_language("fre")


@pytest.mark.parametrize("options", [
    {},
    {"split_by_whitespace": False, "vocab_size": 150},  # pieces span words: one lattice per line
    {"user_defined_symbols": ["<sep>", "Köln"]},
    {"normalization_rule_name": "identity", "add_dummy_prefix": False,
     "remove_extra_whitespaces": False},
])
def test_sentencepiece_conversion_matches_sentencepiece(options):
    from core.tokenizer import read_sentencepiece, sentencepiece_encoder

    data = train_spm(ENGLISH + GERMAN, **options)
    proc = sentencepiece.SentencePieceProcessor(model_proto=data)
    ours = sentencepiece_encoder(read_sentencepiece(data, "test.spm"), [])
    # literal special tokens are left out: Marian's tokenizer splits them off before SentencePiece
    texts = [t for t in SAMPLES if "<" not in t] + ENGLISH + GERMAN + [
        "<sep>Grüße aus Köln<sep>  und  Köln", "Köln<sep>", "two  spaces and\ttab "]
    for text in texts:
        assert ours.encode(text).tokens == proc.encode(text, out_type=str), text


def test_decode_matches_marian_tokenizer(ours, hf_tokenizer):
    generator = torch.Generator().manual_seed(0)
    V = ours.config.vocab_size
    sequences = [torch.randint(0, V, (int(n),), generator=generator).tolist()
                 for n in torch.randint(0, 12, (300,), generator=generator)]
    space = ours.tokenizer.vocab["\u2581"]
    sequences += [[space], [space, space, 5, space], [5, space, 0]]
    assert ours.tokenizer.decode_batch(sequences) == [
        hf_tokenizer.decode(s, skip_special_tokens=True) for s in sequences]


# ---- weights from pytorch_model.bin --------------------------------------------------------

def bin_copy(marian_dir, tmp_path, state) -> Path:
    path = tmp_path / "opus-mt-en-de-bin"
    shutil.copytree(marian_dir, path)
    (path / "model.safetensors").unlink()
    torch.save(state, path / "pytorch_model.bin")
    return path


def test_pytorch_bin_goes_through_weights_only_load(marian_dir, hf_model, ours, tmp_path,
                                                    monkeypatch):
    # the full state dict: tied copies of the embedding and the stored position tables too
    path = bin_copy(marian_dir, tmp_path, hf_model.state_dict())
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or real_load(*a, **kw))
    loaded = models.load(str(path), device="cpu")
    assert [kw.get("weights_only") for kw in calls] == [True]
    for name, tensor in ours.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_refused(marian_dir, tmp_path):
    Exploit.marker = tmp_path / "pwned"
    path = bin_copy(marian_dir, tmp_path, {"model.shared.weight": Exploit()})
    with pytest.raises(ModelError, match="cannot be read as plain tensors"):
        models.load(str(path), device="cpu")
    assert not Exploit.marker.exists()


def test_positions_that_are_not_sinusoids_are_refused(marian_dir, hf_model, tmp_path):
    state = dict(hf_model.state_dict())
    state["model.encoder.embed_positions.weight"] = torch.zeros_like(
        state["model.encoder.embed_positions.weight"])
    with pytest.raises(ModelError, match="not Marian's sinusoids"):
        models.load(str(bin_copy(marian_dir, tmp_path, state)), device="cpu")


@pytest.mark.parametrize("change, message", [
    ({"model_type": "bart"}, "Hugging Face 'bart' model; only Marian"),
    ({"share_encoder_decoder_embeddings": False}, "separate source and target embeddings"),
    ({"decoder_ffn_dim": 128}, "different feed-forward widths"),
    ({"activation_function": "tanh"}, "activation 'tanh'"),
])
def test_unsupported_marian_configs_are_clear_errors(marian_dir, tmp_path, change, message):
    path = tmp_path / "m"
    shutil.copytree(marian_dir, path)
    config = json.loads((path / "config.json").read_text()) | change
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=message):
        models.load(str(path), device="cpu")


# ---- the cache of converted copies -----------------------------------------------------------

def test_converted_copy_reloads_without_the_original(marian_dir, ours, monkeypatch):
    def no(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(marian, "convert", no)
    assert models.resolve(str(marian_dir)) == ours.path
    again = models.load(str(marian_dir), device="cpu")
    assert torch.equal(again.model.embed.weight, ours.model.embed.weight)


def test_a_changed_directory_is_converted_again(marian_dir, tmp_path, ours):
    path = tmp_path / "opus-mt-en-de"
    shutil.copytree(marian_dir, path)
    first = models.resolve(str(path))
    assert first != ours.path  # another directory, another copy
    os.utime(path / "vocab.json", ns=(1, 1))
    assert models.resolve(str(path)) != first


@pytest.fixture
def hf_cache(tmp_path, marian_dir, monkeypatch):
    """A Hugging Face cache holding REPO at COMMIT, as snapshot_download leaves it."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    repo = cache / f"models--{REPO.replace('/', '--')}"
    shutil.copytree(marian_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("TRANSLATE_CACHE", str(tmp_path / "converted"))
    return cache


def test_hub_id_loads_offline_from_the_hugging_face_cache(hf_cache, ours):
    loaded = models.load(REPO, device="cpu")
    assert loaded.path == hub.hub_dir(REPO, "main")
    assert hub.read_origin(loaded.path) == {"repo": REPO, "revision": "main", "commit": COMMIT}
    assert torch.equal(loaded.model.embed.weight, ours.model.embed.weight)
    shutil.rmtree(hf_cache)  # the converted copy no longer needs the original files
    again = models.load(REPO, device="cpu")
    assert torch.equal(again.model.logits_bias, ours.model.logits_bias)


def test_each_revision_has_its_own_copy(hf_cache):
    refs = hf_cache / f"models--{REPO.replace('/', '--')}" / "refs"
    (refs / "v1").write_text(COMMIT)
    path = models.resolve(REPO, revision="v1")
    assert path == hub.hub_dir(REPO, "v1") != hub.hub_dir(REPO, "main")
    assert hub.read_origin(path)["revision"] == "v1"
    listed = run("models").stdout
    assert f"{REPO}\ten->de\t" in listed and "\thub, --revision v1\t" in listed
    with pytest.raises(ModelNotFound, match="cache lacks"):
        models.resolve(REPO, revision="v2")


def test_hub_id_without_cache_or_network_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFound, match="HF_HUB_OFFLINE is set"):
        models.resolve(REPO)
    result = run("-m", REPO, "Hello")
    assert result.exit_code == 3 and result.stdout == ""
    assert result.stderr.startswith(f"error: no model directory '{REPO}' here, and the Hugging "
                                    f"Face cache lacks {REPO}")
    assert result.stderr.count("\n") == 1 and "translate download" in result.stderr


def test_hub_id_unreachable_hub_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ModelNotFound, match="the Hub cannot be reached"):
        models.resolve(REPO)


def test_download_and_models_list(hf_cache):
    result = run("download", REPO)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{hub.hub_dir(REPO, 'main')}\n"
    listed = run("models").stdout.splitlines()
    assert any(line.startswith(f"{REPO}\ten->de\t") for line in listed)
    assert run("download", "not/a/repo").exit_code == 2


def test_cli_hub_id_with_the_environment_variables(hf_cache, marian_dir, tmp_path):
    """The real thing: a fresh process that only has HF_HUB_OFFLINE and HF_HUB_CACHE."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hf_cache),
               TRANSLATE_CACHE=str(tmp_path / "fresh"))
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "-m", REPO, "-s", "greedy", ENGLISH[0]], env=env,
        capture_output=True, text=True, cwd=Path(__file__).parent.parent, timeout=120)
    assert result.returncode == 0, result.stderr
    translator = Translator.load(str(marian_dir), device="cpu")  # the model's defaults, as the CLI
    assert result.stdout == translator.translate([ENGLISH[0]], strategy="greedy")[0] + "\n"


# ---- the command line ------------------------------------------------------------------------

@pytest.mark.parametrize("flags, options", [
    ([], dict(strategy="beam", beam_size=4, max_length=MAX_LENGTH)),  # the model's own settings
    (["-s", "greedy"], dict(strategy="greedy", max_length=MAX_LENGTH)),
    (["-b", "2", "--length-penalty", "0"], dict(strategy="beam", beam_size=2, length_penalty=0.0,
                                                 max_length=MAX_LENGTH)),
    (["-k", "5", "--seed", "3", "--max-length", "9"], dict(strategy="sample", top_k=5, seed=3,
                                                            max_length=9)),
    (["-p", "0.9", "-T", "0.7", "--seed", "1"], dict(strategy="sample", top_p=0.9,
                                                     temperature=0.7, seed=1,
                                                     max_length=MAX_LENGTH)),
])
def test_cli_translates_a_marian_directory(marian_dir, flags, options):
    lines = ENGLISH[:3]
    result = run("-m", marian_dir, *flags, input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.stderr
    expected = Translator.load(str(marian_dir), device="cpu").translate(lines, **options)
    assert result.stdout == "".join(t + "\n" for t in expected)


def test_cli_to_language(marian_dir, model_dir):
    result = run("-m", marian_dir, "--to", "fra", "-s", "greedy", ENGLISH[0])
    assert result.exit_code == 0, result.stderr
    translator = Translator.load(str(marian_dir), device="cpu", to="fra")
    assert result.stdout == translator.translate([ENGLISH[0]], strategy="greedy")[0] + "\n"
    for model, to, message in [(marian_dir, "xx", "unknown target language 'xx'"),
                               (model_dir, "fra", "only for multilingual models")]:
        result = run("-m", model, "--to", to, "Hello")
        assert result.exit_code == 2 and message in result.stderr
        assert result.stderr.count("\n") == 1
    result = run("-m", marian_dir, "--revision", "v1", "Hello")
    assert result.exit_code == 2 and "--revision applies to Hugging Face Hub ids" in result.stderr


@pytest.mark.parametrize("flags, merged", [
    ({}, {"strategy": "beam", "beam_size": 4, "max_length": 30}),
    ({"max_length": 5}, {"strategy": "beam", "beam_size": 4, "max_length": 5}),
    ({"strategy": "greedy"}, {"strategy": "greedy", "max_length": 30}),
    ({"top_k": 5}, {"top_k": 5, "max_length": 30}),
    ({"n_best": 3}, {"n_best": 3, "beam_size": 4, "max_length": 30}),
    ({"beam_size": 2}, {"beam_size": 2, "max_length": 30}),
])
def test_model_defaults_fill_in_what_the_user_left_out(flags, merged):
    names = ("strategy", "beam_size", "n_best", "top_k", "max_length")
    given = {n: flags.get(n) for n in names}
    result = with_model_defaults(given, {"strategy": "beam", "beam_size": 4, "max_length": 30})
    assert {k: v for k, v in result.items() if v is not None} == merged
    assert with_model_defaults(given, {}) == given  # our own models suggest nothing


@pytest.mark.parametrize("content, message", [
    ({"beam_size": 0}, "beam size must be at least 1"),
    ({"beams": 4}, "must map decoding options"),
])
def test_bad_generation_json_is_a_model_error(model_dir, tmp_path, content, message):
    path = tmp_path / "m"
    shutil.copytree(model_dir, path)
    (path / "generation.json").write_text(json.dumps(content))
    with pytest.raises(ModelError, match=message):
        checkpoint.load(str(path), device="cpu")
