"""Copy-through check: do numbers, prices, dates, times, URLs, e-mail addresses, @handles, file
paths, code-like tokens, emoji and names come out of a translation as they went in?

    python -m benchmarks.copythrough -m en-de          # 200 English sentences -> German
    python -m benchmarks.copythrough -m de-en          # 200 German sentences -> English
    python -m benchmarks.copythrough -m en-de --write copy.en   # the test sentences only

The sentences are built here from carrier sentences and span lists of their own (seeded), none
of which the training augmentation (core/augment.py) uses, so the model has to copy rather than
recall. A span survives when it appears verbatim in the output; in a number a decimal point may
become a comma and back ("3.5" -> "3,5"), never a digit changed. Prints a table by span kind."""

from __future__ import annotations

import argparse
import random
import sys
from collections import Counter

CARRIERS = {
    "en": [
        "Please send the invoice for {price} to {email} by {date}.",
        "The meeting starts at {time} in room {number}.",
        "{name} said the update is available at {url}.",
        "Follow {handle} for news about the project.",
        "Open the file {path} and change the limit to {number}.",
        "Run {code} before you start the server.",
        "We sold {number} tickets on {date}.",
        "Thank you so much for the flowers {emoji}",
        "{name} will arrive on {date} at {time}.",
        "The total comes to {price}, including tax.",
        "My new address is {email}, please update your records.",
        "The report is saved as {path}.",
        "Call {name} if the price goes above {price}.",
        "Version {code} fixes the bug that {handle} reported.",
        "I met {name} at the station yesterday.",
        "Temperatures reached {number} degrees on {date}.",
        "Visit {url} for the full list of products.",
        "The train leaves at {time} from platform {number}.",
        "Set {code} to true in {path}.",
        "Great job, {name}! {emoji}",
    ],
    "de": [
        "Bitte schicken Sie die Rechnung über {price} bis zum {date} an {email}.",
        "Die Besprechung beginnt um {time} in Raum {number}.",
        "{name} sagte, das Update sei unter {url} verfügbar.",
        "Folgen Sie {handle}, um Neuigkeiten über das Projekt zu erhalten.",
        "Öffne die Datei {path} und ändere die Grenze auf {number}.",
        "Führen Sie {code} aus, bevor Sie den Server starten.",
        "Wir haben am {date} {number} Karten verkauft.",
        "Vielen Dank für die Blumen {emoji}",
        "{name} kommt am {date} um {time} an.",
        "Der Gesamtbetrag beläuft sich auf {price}, inklusive Steuern.",
        "Meine neue Adresse ist {email}, bitte aktualisieren Sie Ihre Unterlagen.",
        "Der Bericht ist unter {path} gespeichert.",
        "Ruf {name} an, wenn der Preis über {price} steigt.",
        "Version {code} behebt den Fehler, den {handle} gemeldet hat.",
        "Ich habe {name} gestern am Bahnhof getroffen.",
        "Die Temperaturen erreichten am {date} {number} Grad.",
        "Auf {url} finden Sie die vollständige Liste der Produkte.",
        "Der Zug fährt um {time} von Gleis {number} ab.",
        "Setze {code} in {path} auf true.",
        "Gut gemacht, {name}! {emoji}",
    ],
}

NAMES = ["Priya Raman", "Jonas Eklund", "Olu Adeyemi", "Mei Tanaka", "Rafael Ortega",
         "Ingrid Solberg", "Tariq Haddad", "Chiara Bellini", "Aleksander Nowak", "Sven",
         "Fatima", "Dmitri Volkov", "Lena Hofstetter", "Kwame", "Ana Lucía Paredes"]
DOMAINS = ["example.com", "github.com", "acme-widgets.io", "stadtwerke-nord.de", "uni-graz.at"]
EMOJI = ["🙂", "🎂", "🌻", "👏", "💐", "🥳"]
CODE = ["max_retries", "parse_args()", "useEffect", "DEBUG_MODE", "v3.2.1", "np.zeros()",
        "--no-cache", "HTTP_PROXY", "user.id", "ISSUE-4821"]


def make_span(kind: str, rng: random.Random) -> str:
    if kind == "price":
        amount = f"{rng.randint(1, 999)}.{rng.randint(0, 99):02d}"
        return rng.choice([f"${amount}", f"€{amount}", f"{amount} EUR", f"£{amount}"])
    if kind == "date":
        y, m, d = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
        return rng.choice([f"{y}-{m:02d}-{d:02d}", f"{d:02d}.{m:02d}.{y}"])
    if kind == "time":
        return f"{rng.randint(6, 22)}:{rng.choice(['00', '15', '30', '45', '05', '50'])}"
    if kind == "number":
        return str(rng.choice([rng.randint(2, 99), rng.randint(100, 9999), rng.randint(10000, 250000)]))
    if kind == "email":
        first, last = rng.choice(NAMES).lower().split()[0], rng.choice(["mueller", "smith", "ito", "ray"])
        return f"{first}.{last}@{rng.choice(DOMAINS)}"
    if kind == "url":
        return f"https://{rng.choice(DOMAINS)}/{rng.choice(['docs', 'releases', 'shop', 'help'])}/{rng.randint(1, 500)}"
    if kind == "handle":
        return "@" + rng.choice(["opensource_fan", "MariaCodes", "devnews24", "kleiner_baer", "the_real_jo"])
    if kind == "path":
        return rng.choice(["/etc/nginx/nginx.conf", "~/Documents/budget_2024.xlsx", "C:\\Temp\\setup.log",
                           "src/main.rs", "./build/output.bin", "/var/log/syslog"])
    if kind == "code":
        return rng.choice(CODE)
    if kind == "emoji":
        return rng.choice(EMOJI)
    if kind == "name":
        return rng.choice(NAMES)
    raise ValueError(kind)


def make(lang: str, n: int = 200, seed: int = 2026) -> list[tuple[str, list[tuple[str, str]]]]:
    """n sentences in `lang`, each with the (kind, span) pairs it holds."""
    import string

    rng = random.Random(seed)
    out = []
    carriers = CARRIERS[lang]
    for i in range(n):
        carrier = carriers[i % len(carriers)]
        spans, values = [], {}
        for _, field, _, _ in string.Formatter().parse(carrier):
            if field and field not in values:
                values[field] = make_span(field, rng)
                spans.append((field, values[field]))
        out.append((carrier.format(**values), spans))
    return out


NUMERIC = {"price", "date", "time", "number"}


def survives(kind: str, span: str, output: str) -> bool:
    if span in output:
        return True
    return kind in NUMERIC and span.translate(str.maketrans(".,", ",.")) in output


def score(items, outputs: list[str]) -> tuple[Counter, Counter, int]:
    """Per kind: spans seen and spans kept; and the number of sentences that kept every span."""
    seen, kept, whole = Counter(), Counter(), 0
    for (_, spans), out in zip(items, outputs):
        ok = [survives(kind, span, out) for kind, span in spans]
        for (kind, _), good in zip(spans, ok):
            seen[kind] += 1
            kept[kind] += good
        whole += all(ok)
    return seen, kept, whole


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default="en-de")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--write", help="write the source sentences to this file and stop")
    parser.add_argument("--show-failures", action="store_true")
    args = parser.parse_args(argv)

    from core import models
    from core.config import ModelConfig
    from core.translator import Translator

    path = models.resolve(args.model)
    lang = ModelConfig.load(path / "config.json").source_lang or "en"
    items = make(lang, args.n)
    if args.write:
        with open(args.write, "w", encoding="utf-8") as f:
            f.writelines(s + "\n" for s, _ in items)
        return
    ckpt = models.load(args.model, "cpu", dtype=args.dtype)
    outputs = Translator(ckpt.model, ckpt.tokenizer).translate(
        [s for s, _ in items], **ckpt.generation)
    seen, kept, whole = score(items, outputs)
    print("| span kind | spans | kept | rate |\n|---|---|---|---|")
    for kind in sorted(seen):
        print(f"| {kind} | {seen[kind]} | {kept[kind]} | {kept[kind] / seen[kind]:.1%} |")
    print(f"| all spans | {sum(seen.values())} | {sum(kept.values())} | "
          f"{sum(kept.values()) / sum(seen.values()):.1%} |")
    print(f"\nsentences with every span intact: {whole} of {len(items)} ({whole / len(items):.1%})"
          f"  [{args.model}, {args.dtype}, {lang} source]")
    if args.show_failures:
        for (src, spans), out in zip(items, outputs):
            lost = [s for k, s in spans if not survives(k, s, out)]
            if lost:
                print(f"- {src}\n  -> {out}\n  lost: {lost}", file=sys.stderr)


if __name__ == "__main__":
    main()
