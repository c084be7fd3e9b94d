"""Copy-through augmentation: training pairs that teach the model to copy what must not be
translated (numbers, prices, dates, times, URLs, e-mail addresses, @handles, file paths,
code-like tokens, emoji, capitalised names, and core.segment's placeholders).

Each new pair is a real pair with the same random span on both sides: put in place of a
number or a name the two sides share, or next to the sentence; a few are the span alone or
the pair in capitals. Names and spans are generated, so the model cannot learn them by heart
and has to copy."""

from __future__ import annotations

import random
import re
import string

_SYLLABLES = ["ka", "lo", "mi", "ra", "ve", "to", "sen", "dor", "bri", "nu", "el", "zan",
              "fi", "gar", "ho", "li", "mar", "qu", "sta", "win", "ber", "ko", "an", "jo"]
_TLDS = ["com", "org", "net", "de", "io", "eu", "info", "co.uk", "at", "ch"]
_EMOJI = ["😀", "😂", "🎉", "👍", "❤️", "🚀", "🙏", "🔥", "✅", "⚠️", "📞", "☕", "🌍", "😉"]
_CURRENCIES = ["$", "€", "£", "¥", "CHF ", "USD ", "EUR "]


def _word(rng: random.Random, n: int | None = None) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(n or rng.randint(2, 3)))


# Names are built from open sets of sounds, not a fixed list of syllables: with only a few
# syllables the model copied those and still "translated" real names (Kwame -> Cwame,
# Eklund -> Eclund, Hofstetter -> Hofsters), so onsets, vowels and codas are drawn from
# many languages' spellings, with accents now and then.
_ONSETS = ["b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
           "y", "z", "b", "d", "k", "l", "m", "n", "r", "s", "t", "br", "ch", "dr", "gr", "kh",
           "kr", "pl", "sch", "sh", "sk", "st", "th", "tr", "ts", "zh", "ph", "ñ", "ç", "ł"]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "i", "o", "a", "e", "y", "ai", "ei", "ie", "ou",
           "é", "á", "í", "ó", "ö", "ü", "ä", "ø", "å"]
_CODAS = ["n", "m", "r", "l", "s", "k", "t", "d", "ng", "nd", "rt", "st", "ck", "tt", "ll",
          "ss", "x", "z", "sh", "th", "rn", "ks"]


def _name_word(rng: random.Random) -> str:
    parts = []
    for i in range(rng.choice([1, 2, 2, 2, 3, 3])):
        onset = "" if i == 0 and rng.random() < 0.2 else rng.choice(_ONSETS)
        vowel = rng.choice(_VOWELS if rng.random() < 0.3 else _VOWELS[:11])
        parts.append(onset + vowel + (rng.choice(_CODAS) if rng.random() < 0.35 else ""))
    word = "".join(parts).capitalize()
    return word if len(word) >= 3 else _name_word(rng)  # not "I" or "U"


def name(rng: random.Random) -> str:
    words = [_name_word(rng) for _ in range(rng.choice([1, 1, 2, 2, 2, 3]))]
    if len(words) > 1 and rng.random() < 0.1:  # a particle: "de", "van", "al", "bin" ...
        words.insert(-1, rng.choice(["de", "van", "al", "bin", "da", "del", "ter", "el"]))
    return " ".join(words)


def number(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.5:
        return str(rng.randint(0, 10 ** rng.randint(1, 6)))
    if kind < 0.8:
        return f"{rng.randint(0, 999)}.{rng.randint(0, 99):0{rng.choice([1, 2])}d}"
    return f"{rng.randint(1, 99)},{rng.randint(0, 999):03d}"


def price(rng: random.Random) -> str:
    amount = f"{rng.randint(0, 9999)}.{rng.randint(0, 99):02d}" if rng.random() < 0.7 \
        else str(rng.randint(1, 5000))
    cur = rng.choice(_CURRENCIES)
    return cur + amount if rng.random() < 0.7 else f"{amount} {cur.strip()}"


def date(rng: random.Random) -> str:
    y, m, d = rng.randint(1950, 2035), rng.randint(1, 12), rng.randint(1, 28)
    return rng.choice([f"{y}-{m:02d}-{d:02d}", f"{d:02d}.{m:02d}.{y}", f"{m}/{d}/{y}"])


def time_of_day(rng: random.Random) -> str:
    return f"{rng.randint(0, 23)}:{rng.randint(0, 59):02d}" + (
        f":{rng.randint(0, 59):02d}" if rng.random() < 0.2 else "")


def url(rng: random.Random) -> str:
    host = f"{rng.choice(['www.', '', 'shop.', 'docs.'])}{_word(rng)}.{rng.choice(_TLDS)}"
    path = "/".join(_word(rng, 1) + rng.choice(["", str(rng.randint(1, 99))])
                    for _ in range(rng.randint(0, 3)))
    query = f"?id={rng.randint(1, 99999)}" if rng.random() < 0.2 else ""
    return f"{rng.choice(['https://', 'http://', 'https://', ''])}{host}/{path}{query}".rstrip("/")


def email(rng: random.Random) -> str:
    user = rng.choice([_word(rng), f"{_word(rng)}.{_word(rng)}", f"{_word(rng)}{rng.randint(1, 99)}"])
    return f"{user}@{_word(rng)}.{rng.choice(_TLDS)}"


def handle(rng: random.Random) -> str:
    return "@" + rng.choice([_word(rng), f"{_word(rng)}_{_word(rng)}", f"{_word(rng)}{rng.randint(1, 999)}"])


def path(rng: random.Random) -> str:
    parts = [_word(rng, rng.randint(1, 2)) for _ in range(rng.randint(1, 3))]
    ext = rng.choice(["txt", "pdf", "py", "json", "csv", "log", "docx", "sh"])
    style = rng.random()
    if style < 0.4:
        return "/" + "/".join(parts) + f".{ext}"
    if style < 0.6:
        return "~/" + "/".join(parts) + f".{ext}"
    if style < 0.8:
        return "C:\\" + "\\".join(p.capitalize() for p in parts) + f".{ext}"
    return "/".join(parts) + f".{ext}"


def code(rng: random.Random) -> str:
    a, b = _word(rng), _word(rng)
    return rng.choice([f"{a}_{b}", f"{a}_{b}()", f"{a.capitalize()}{b.capitalize()}",
                       f"{a}.{b}()", f"{a.upper()}_{b.upper()}", f"--{a}-{b}", f"{a}.{b}",
                       f"v{rng.randint(0, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 9)}",
                       f"{rng.choice(string.ascii_uppercase)}{rng.choice(string.ascii_uppercase)}-{rng.randint(100, 9999)}"])


def placeholder(rng: random.Random) -> str:
    """What core.segment puts in place of a protected span (a URL, a path, code) before
    translating; the model learns to copy it."""
    return f"<x{rng.randint(1, 6)}>"


def emoji(rng: random.Random) -> str:
    return "".join(rng.choice(_EMOJI) for _ in range(rng.choice([1, 1, 1, 2, 3])))


NUMERIC = [number, price, date, time_of_day]
SPANS = NUMERIC + [url, email, handle, path, code, emoji, name, name, placeholder, placeholder]

_NUMBER = re.compile(r"(?<![\w.,:])\d+(?![\w.,:]\d)")
_NAME = re.compile(r"(?<=\w )[A-Z][a-z]{2,}\b")


def _replace_shared(src: str, tgt: str, pattern: re.Pattern, span: str):
    """Replace the one match of `pattern` that occurs exactly once on both sides."""
    found = [m.group() for m in pattern.finditer(src)]
    for word in dict.fromkeys(found):  # in order: the same pairs in every process
        if found.count(word) == 1 and len(re.findall(rf"(?<!\w){re.escape(word)}(?!\w)", tgt)) == 1:
            swap = lambda text: re.sub(rf"(?<!\w){re.escape(word)}(?!\w)",  # noqa: E731
                                       lambda _: span, text, count=1)
            return swap(src), swap(tgt)
    return None


def augment_pair(src: str, tgt: str, rng: random.Random) -> tuple[str, str]:
    """One copy-through variant of a pair."""
    choice = rng.random()
    if choice < 0.35:
        new = (_replace_shared(src, tgt, _NUMBER, rng.choice(NUMERIC)(rng))
               or _replace_shared(src, tgt, _NAME, name(rng)))
        if new:
            return new
    span = rng.choice(SPANS)(rng)
    if choice < 0.45:
        return span, span
    if choice < 0.5:
        return src.upper(), tgt.upper()
    where = rng.random()
    if where < 0.35:
        return f"{src} ({span})", f"{tgt} ({span})"
    if where < 0.6:
        return f"{span}: {src}", f"{span}: {tgt}"
    if where < 0.85:
        return f"{src} {span}", f"{tgt} {span}"
    cut = src.rstrip(".!?")
    tcut = tgt.rstrip(".!?")
    return f"{cut} {span}{src[len(cut):]}", f"{tcut} {span}{tgt[len(tcut):]}"


def augment(pairs: list[tuple[str, str]], n: int, seed: int) -> list[tuple[str, str]]:
    """n copy-through variants of pairs drawn at random from `pairs` (seeded)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n if pairs else 0):
        pair = augment_pair(*rng.choice(pairs), rng)
        out.append(augment_pair(*pair, rng) if rng.random() < 0.3 else pair)  # two spans
    return out
