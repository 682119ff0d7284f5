"""The Python steps of the word-count workflow (word_count.toml).

Each step is called as ``function(config, context)`` with the run's effective config and a
``butler.TaskContext``; what it returns is stored as JSON and read back with
``run.output(task)``. Printing and ``context.log`` go to the task's log.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import butler


def count_words(config: dict[str, Any], context: butler.TaskContext) -> dict[str, Any]:
    """Counts the words the `split` step wrote for this sample."""
    words_file = Path(config["work"]) / f"{config['sample']}.words"
    words = words_file.read_text(encoding="utf-8").split()
    counts = Counter(words)
    context.log.info("%s: %d words, %d distinct", config["sample"], len(words), len(counts))
    if config.get("fail_on_empty") and not words:
        raise ValueError(f"{words_file} holds no words; is {config['text']} empty?")
    return {
        "sample": config["sample"],
        "words": len(words),
        "distinct": len(counts),
        "top": [[word, count] for word, count in counts.most_common(config.get("top", 3))],
    }
