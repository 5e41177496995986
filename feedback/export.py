"""Preference pairs as JSONL in TRL's conversational preference format, and demonstrations in
its conversational SFT format.

One line per pair: {"prompt": [{"role", "content"}, ...], "chosen": [{"role": "assistant",
"content": ...}], "rejected": [...]}, which `datasets.load_dataset("json", ...)` loads and TRL's
DPO / reward trainers accept. Pairs come from direct comparisons and from opposite thumbs among
sibling answers (see training_data for the rules); a pair present in both is written once.

Demonstrations (answers users edited into the ones they wanted): one line each,
{"messages": [the context path, root first ..., {"role": "assistant", "content": the
demonstrated answer}]}, which TRL's SFTTrainer trains on unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
from tqdm import tqdm

from . import training_data
from .training_data import Answer, ChatTurn

log = logging.getLogger(__name__)


@dataclass
class ExportCounts:
    comparison_pairs: int = 0  # lines written from comparisons
    thumb_pairs: int = 0  # lines written from opposite thumbs
    duplicates: int = 0  # pairs skipped because the same texts were already written

    @property
    def written(self) -> int:
        return self.comparison_pairs + self.thumb_pairs


@dataclass(frozen=True)
class _Pair:
    source: str  # "comparison" or "thumbs"
    prompt_id: UUID
    prompt: list[ChatTurn]
    chosen: Answer
    rejected: Answer
    row_ids: list[int]  # comparisons.id or ratings.id


def _pairs(conn: psycopg.Connection) -> Iterator[_Pair]:
    for group in training_data.comparison_groups(conn):
        for chosen, rejected, preference in group.pairs():
            yield _Pair(
                "comparison", group.prompt_id, group.prompt, chosen, rejected,
                [preference.comparison_id],
            )
    for pair in training_data.thumb_pairs(conn):
        yield _Pair(
            "thumbs", pair.prompt_id, pair.prompt, pair.chosen, pair.rejected, pair.rating_ids
        )


def _record(pair: _Pair, with_ids: bool) -> dict[str, Any]:
    record: dict[str, Any] = {
        "prompt": [{"role": t["role"], "content": t["content"]} for t in pair.prompt],
        "chosen": [{"role": "assistant", "content": pair.chosen.content}],
        "rejected": [{"role": "assistant", "content": pair.rejected.content}],
    }
    if with_ids:  # provenance, for audits and for removing a user's data from a dataset
        record |= {
            "source": pair.source,
            "prompt_id": str(pair.prompt_id),
            "chosen_id": str(pair.chosen.id),
            "rejected_id": str(pair.rejected.id),
            "row_ids": pair.row_ids,
        }
    return record


def export_preferences(
    conn: psycopg.Connection, out: Path, *, with_ids: bool = False
) -> ExportCounts:
    """Write every usable preference pair to `out` (replaced atomically); returns the counts."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    counts = ExportCounts()
    # 16-byte digests of the texts already written: memory grows by ~100 bytes per pair, not
    # by the pair's size, so exports far larger than RAM still dedup across both sources.
    seen: set[bytes] = set()
    with partial.open("w", encoding="utf-8") as file:
        for pair in tqdm(_pairs(conn), desc="export", unit=" pairs", disable=None):
            record = _record(pair, with_ids=False)
            key = hashlib.blake2b(
                json.dumps(record, ensure_ascii=False, sort_keys=True).encode(), digest_size=16
            ).digest()
            if key in seen:
                counts.duplicates += 1
                continue
            seen.add(key)
            if with_ids:
                record = _record(pair, with_ids=True)
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
            if pair.source == "comparison":
                counts.comparison_pairs += 1
            else:
                counts.thumb_pairs += 1
    os.replace(partial, out)
    log.info(
        "exported %d pairs to %s (%d from comparisons, %d from opposite thumbs, "
        "%d duplicates skipped)",
        counts.written, out, counts.comparison_pairs, counts.thumb_pairs, counts.duplicates,
    )
    return counts


@dataclass
class SftExportCounts:
    demonstrations: int = 0  # lines written


def export_demonstrations(
    conn: psycopg.Connection, out: Path, *, with_ids: bool = False
) -> SftExportCounts:
    """Write every usable demonstration to `out` (replaced atomically); returns the counts.

    The store's reader already keeps each (prompt, answer) text once and reads only
    conversations that allow data use."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    counts = SftExportCounts()
    with partial.open("w", encoding="utf-8") as file:
        for demo in tqdm(training_data.demonstrations(conn), desc="export", unit=" demos", disable=None):
            record: dict[str, Any] = {
                "messages": [{"role": t["role"], "content": t["content"]} for t in demo.prompt]
                + [{"role": "assistant", "content": demo.answer.content}]
            }
            if with_ids:  # provenance, as for pairs
                record |= {
                    "source": "demonstration",
                    "message_id": str(demo.answer.id),
                    "edited_from": None if demo.edited_from is None else str(demo.edited_from),
                    "prompt_ids": [str(i) for i in demo.prompt_ids],
                }
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
            counts.demonstrations += 1
    os.replace(partial, out)
    log.info("exported %d demonstrations to %s", counts.demonstrations, out)
    return counts
