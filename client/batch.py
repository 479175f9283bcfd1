"""``seqserve predict``: whole-sequence inference on files, written as CSV or JSON."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from .aio import AsyncClient
from .inputs import check_features, load_recordings, truth_label

__all__ = ["predict_command"]


async def predict_command(client: AsyncClient, args: argparse.Namespace) -> int:
    model = await client.model(args.model, version=args.version)
    recordings = [r for source in args.sources for r in load_recordings(source, model.name)]
    check_features(recordings, model)
    results = await client.predict(
        [r.frames for r in recordings],
        per_step=args.per_step,
        model=args.model,
        version=args.version,
    )
    buffer = io.StringIO()
    if args.format == "json":
        records = []
        for rec, res in zip(recordings, results, strict=True):
            record: dict[str, Any] = {
                "source": rec.name,
                "model": res.model,
                "version": res.model_version,
                "label": res.label,
                "confidence": round(res.confidence, 6),
                "probabilities": dict(zip(model.labels, map(_num, res.probabilities), strict=True)),
            }
            if rec.truth is not None:
                record["truth"] = truth_label(rec.truth, model)
            if res.per_step is not None:
                record["per_step"] = [[_num(v) for v in row] for row in res.per_step]
            records.append(record)
        buffer.write(json.dumps(records, indent=2) + "\n")
    else:
        writer = csv.writer(buffer, lineterminator="\n")
        truths = any(r.truth is not None for r in recordings)
        head = [
            "source",
            *(["step"] if args.per_step else []),
            "label",
            "confidence",
            *(["truth"] if truths else []),
            *model.labels,
        ]
        writer.writerow(head)
        for rec, res in zip(recordings, results, strict=True):
            known = truth_label(rec.truth, model) if rec.truth is not None else ""
            truth = [known] if truths else []
            if res.per_step is None:
                writer.writerow(
                    [
                        rec.name,
                        res.label,
                        _num(res.confidence),
                        *truth,
                        *map(_num, res.probabilities),
                    ]
                )
                continue
            for step, row in enumerate(res.per_step):
                top = int(row.argmax())
                writer.writerow(
                    [rec.name, step, model.labels[top], _num(row[top]), *truth, *map(_num, row)]
                )
    if args.output:
        Path(args.output).write_text(buffer.getvalue())
    else:
        sys.stdout.write(buffer.getvalue())
    return 0


def _num(value: Any) -> float:
    return round(float(value), 6)
