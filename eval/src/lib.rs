//! afm-eval: benchmark formats (MMLU, MMMLU, MGSM, JSONL), prompting, scoring, runner, reports.
