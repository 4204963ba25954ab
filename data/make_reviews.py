"""Write data/reviews.csv and data/reviews.parquet: 200 short product reviews to label by sentiment.

The reviews are composed from hand-written fragments with a fixed seed, so the files can be
rebuilt byte for byte: `python data/make_reviews.py`. `expected` is the sentiment the fragments
were chosen for, so a labeling run can be scored.
"""

from __future__ import annotations

import random
from pathlib import Path

import polars as pl

PRODUCTS = [
    "wireless earbuds", "espresso machine", "hiking backpack", "phone case", "standing desk",
    "electric kettle", "mechanical keyboard", "running shoes", "air fryer", "e-reader",
    "robot vacuum", "yoga mat", "desk lamp", "smart watch", "cast iron pan",
]  # fmt: skip

OPENERS = {
    "positive": [
        "Honestly better than I expected.", "Five stars, no hesitation.", "Bought this for my partner and we both love it.",
        "Third one I've owned and still the best.", "Arrived a day early and works perfectly.", "Great value for the price.",
    ],
    "negative": [
        "Really disappointed.", "Returned it after a week.", "Do not buy this.", "Looked nice in the photos, not in person.",
        "Stopped working after two weeks.", "Customer service never answered my emails.",
    ],
    "neutral": [
        "It does what it says.", "Average, nothing special.", "Fine for the price, I guess.", "Some good, some bad.",
        "Works, but I have mixed feelings.", "Neither impressed nor disappointed.",
    ],
}  # fmt: skip

DETAILS = {
    "positive": [
        "The build quality is solid and it feels premium.", "Setup took five minutes.", "Battery lasts all week.",
        "It's quiet, which matters in a small flat.", "Cleaning it is easy.", "Looks great on my desk. 😍",
    ],
    "negative": [
        "The plastic creaks and one clip snapped on day two.", "The instructions were missing half the steps.",
        "It overheats after twenty minutes.", "The colour is nothing like the listing.", "Way too loud to use at night.",
        "Smells of chemicals even after airing it out. 👎",
    ],
    "neutral": [
        "The size is as listed.", "Delivery took the usual week.", "The app is okay but a bit slow.",
        "It's lighter than my old one but feels less sturdy.", "Packaging was plain cardboard.", "Colour matches the photo.",
    ],
}  # fmt: skip

CLOSERS = {
    "positive": ["Would buy again.", "Recommended!", "Worth every penny.", ""],
    "negative": ["Avoid.", "Waste of money.", "One star is generous.", ""],
    "neutral": ["It'll do.", "Three stars.", "Can't say more yet.", ""],
}

# A few reviews in other languages and scripts, as any real marketplace export has.
FOREIGN = [
    ("positive", "Sehr gute Qualität, schnelle Lieferung. Gerne wieder!"),
    ("negative", "Llegó roto y el vendedor no responde."),
    ("neutral", "C'est correct, sans plus."),
    ("positive", "منتج رائع وجودة ممتازة، أنصح به"),
    ("negative", "המוצר הגיע שבור ולא קיבלתי החזר"),
    ("positive", "とても使いやすいです。買ってよかった！"),  # noqa: RUF001 (Japanese punctuation is the point)
]

STARS = {"positive": (4, 5), "neutral": (3, 3), "negative": (1, 2)}


def build(n: int = 200, seed: int = 20261126) -> pl.DataFrame:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if i % 37 == 11:
            sentiment, review = FOREIGN[(i // 37) % len(FOREIGN)]
        else:
            sentiment = rng.choices(["positive", "negative", "neutral"], weights=[5, 3, 2])[0]
            parts = [
                rng.choice(OPENERS[sentiment]),
                rng.choice(DETAILS[sentiment]),
                rng.choice(CLOSERS[sentiment]),
            ]
            review = " ".join(p for p in parts if p)
        rows.append(
            {
                "id": f"r{i + 1:04d}",
                "product": rng.choice(PRODUCTS),
                "stars": rng.randint(*STARS[sentiment]),
                "review": review,
                "expected": sentiment,
            }
        )
    return pl.DataFrame(
        rows,
        schema={
            "id": pl.String,
            "product": pl.String,
            "stars": pl.Int64,
            "review": pl.String,
            "expected": pl.String,
        },
    )


if __name__ == "__main__":
    here = Path(__file__).parent
    frame = build()
    frame.write_csv(here / "reviews.csv")
    frame.write_parquet(here / "reviews.parquet")
    print(f"wrote {frame.height} reviews to {here}")
