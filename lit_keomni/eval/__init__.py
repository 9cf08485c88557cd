"""Evaluation: ASR error rates (``asr``), StoryCloze (``storycloze``), spoken QA (``spoken_qa``), UTMOS (``utmos``) and
an LLM judge (``judge``). Every task runs from exports (never from a stage's LightningModule) and writes a JSON report
and a Markdown table (``report.write_report``)."""
