"""A small datanet version for the index tests: five ~40-word passages and their contribution ids."""

from __future__ import annotations

import hashlib

# Five ~40-word passages. Phrases the tests look for:
#   "copper lanterns swing above the ferry landing"  only in passage 0
#   "the granary roof leaks whenever"                  in passages 1 and 2
#   "salt marsh"                                       in passages 0, 3 and 4
PASSAGES = [
    "Every evening the keeper walks along the quay while copper lanterns swing above the ferry landing and "
    "the salt marsh breathes fog across the water; fishermen count their nets, mend the torn ones, and argue "
    "about the price of eels until the bell rings.",
    "The miller keeps a ledger of every sack that passes his door. He complains that the granary roof leaks "
    "whenever the wind turns east, so the children stack barrels under the worst holes and listen to the rain "
    "drumming on the tin.",
    "Our village council met twice this spring. They agreed that the granary roof leaks whenever storms come "
    "from the sea, voted to buy new slate from the quarry, and asked the blacksmith to forge stronger hooks "
    "for the gutters.",
    "Children learn to swim in the shallow pools behind the dunes, where the salt marsh keeps the water warm "
    "until late September; their grandmothers watch from wooden benches, knitting scarves and trading recipes "
    "for plum jam and barley bread.",
    "A traveling painter rented the attic above the bakery for a month. She painted the salt marsh at dawn "
    "forty times, never satisfied with the green, and left the village owing nothing but a small portrait of "
    "the baker's dog.",
]


def contribution_id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


DOCUMENTS = [(contribution_id(text), text) for text in PASSAGES]
