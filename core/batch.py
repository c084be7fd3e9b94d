"""A batch of lines in, their translations out: the function for other people's pipelines.

    from core.batch import TranslateBatch
    ds = ray.data.read_text("corpus.txt", drop_empty_lines=False)
    ds = ds.map_batches(TranslateBatch, fn_constructor_kwargs={"to": "de"}, concurrency=4)
    # each actor loads the model once; each batch gains a "translation" column

TranslateBatch takes what `translate` takes (model, languages, device, precision, decoding
options as DecodeOptions' fields) and loads the model once, when made; called on a batch (a
dict of columns, lists or numpy arrays, as Ray Data's "default"/"numpy" format gives, or a
pandas DataFrame, as Ray's "pandas" format and Spark's mapInPandas give) with a `text` column,
it returns the batch with a `translation` column added, one translation per line, in order.
Nothing else is kept between calls, so a call is a pure function of its batch."""

from __future__ import annotations

from core.route import build


class TranslateBatch:
    def __init__(self, model: str | None = None, *, revision: str | None = None,
                 source: str | None = None, to: str | None = None, via: str | None = None,
                 device: str = "auto", dtype: str = "float32", batch_size: int = 32,
                 column: str = "text", detect: bool = True, **decoding):
        self.router = build(model, revision=revision, source=source, to=to, via=via,
                            device=device, dtype=dtype, batch_size=batch_size, detect=detect)
        self.router.translator(self.router.default[-1]).options(**decoding)  # bad options: now
        self.flags, self.column = decoding, column

    def translate(self, lines: list[str]) -> list[str]:
        return [nbest[0].text for nbest in self.router.iter_translate(lines, self.flags)]

    def __call__(self, batch):
        lines = [str(line) for line in batch[self.column]]
        translations = self.translate(lines)
        if hasattr(batch, "assign"):  # a pandas DataFrame
            return batch.assign(translation=translations)
        return {**batch, "translation": translations}
