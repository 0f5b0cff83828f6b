"""``viq demo`` and everything only it needs: the synthetic QA set, offline photographs, a tiny LLM,
a small pixel codec and the HTML report. Nothing outside this folder (and the CLI) imports it."""
