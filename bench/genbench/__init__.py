"""The modules of ``bench/generation.py`` (a folder not named ``generation``, which would shadow the script).

``harness`` (configurations, timing, shared tables), one module per section (``tiny``: methods, cache
scaling and sampling; ``real``; ``grounded``) and ``spread`` (``--processes K``).
"""
