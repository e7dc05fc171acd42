"""Key layers, the "trajectory" that MTA aligns (method.md §6).

Layers use HF `output_hidden_states` indexing: 0 = embeddings output, N = last layer.
"""

from __future__ import annotations

import math


def default_key_layers(n_student: int, n_teacher: int, m: int = 3, stride: int | None = None) -> list[tuple[int, int, str]]:
    """m student layers taken top-down with a stride, each paired with its teacher layer.

    Student layers N_S, N_S - s, ..., N_S - (m - 1) s with s = max(1, N_S // 4) by default; the lowest
    is the "word" layer, the others "phrase" layers; teacher layer = floor(l_S * N_T / N_S).
    Returns (student layer, teacher layer, granularity) ascending, e.g. (12, 48) ->
    [(6, 24, "word"), (9, 36, "phrase"), (12, 48, "phrase")].
    """
    if n_student < 1 or n_teacher < 1:
        raise ValueError(f"layer counts must be >= 1, got n_student={n_student}, n_teacher={n_teacher}")
    if m < 1:
        raise ValueError(f"m (number of key layers) must be >= 1, got {m}")
    stride = max(1, n_student // 4) if stride is None else stride
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    student_layers = [n_student - i * stride for i in reversed(range(m))]
    if student_layers[0] < 1:
        raise ValueError(
            f"{m} key layers with stride {stride} reach student layer {student_layers[0]} < 1 "
            f"(the student has {n_student} layers): lower m or the stride"
        )
    pairs = [(l_s, l_s * n_teacher // n_student) for l_s in student_layers]
    if pairs[0][1] < 1:
        raise ValueError(
            f"student layer {pairs[0][0]} maps to teacher layer {pairs[0][1]} < 1 "
            f"(teacher {n_teacher} layers, student {n_student}): lower m or the stride"
        )
    return [(l_s, l_t, "word" if i == 0 else "phrase") for i, (l_s, l_t) in enumerate(pairs)]


def default_teacher_layers(n_teacher: int) -> list[int]:
    """Teacher layers at depth 1/2, 3/4 and 1, deduplicated, ascending: 30 -> [15, 22, 30]; 12 -> [6, 9, 12].

    What an extraction stores when the student is not known yet; it matches the teacher side of
    `default_key_layers` whenever N_S is a multiple of 4.
    """
    if n_teacher < 1:
        raise ValueError(f"n_teacher must be >= 1, got {n_teacher}")
    return sorted({layer for layer in (n_teacher // 2, (3 * n_teacher) // 4, n_teacher) if layer >= 1})


def pair_teacher_layers(teacher_layers: list[int], n_student: int, n_teacher: int) -> list[tuple[int, int, str]]:
    """Each teacher layer (>= 1) with the student layer at the same relative depth, distinct and ascending.

    Top-down, as method.md §6 picks student layers: the highest teacher layer gets the student layer
    nearest t * N_S / N_T (rounded half up, at least 1); each lower one the nearest layer below the one
    just taken. A teacher layer left without a free student layer is dropped (a student shallower than
    the list). The lowest pair is word-level, the others phrase-level. (30 layers, [15, 22, 30], 8) ->
    [(4, 15, "word"), (6, 22, "phrase"), (8, 30, "phrase")], the method's default for that student.
    """
    if n_student < 1 or n_teacher < 1:
        raise ValueError(f"layer counts must be >= 1, got n_student={n_student}, n_teacher={n_teacher}")
    pairs, ceiling = [], n_student + 1
    for t in sorted({t for t in teacher_layers if t >= 1}, reverse=True):
        s = min(max(1, math.floor(t * n_student / n_teacher + 0.5)), ceiling - 1)
        if s < 1:
            break
        pairs.append((s, t))
        ceiling = s
    pairs.reverse()
    return [(s, t, "word" if i == 0 else "phrase") for i, (s, t) in enumerate(pairs)]
