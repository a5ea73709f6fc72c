"""vialign: align visual generative models with rewards.

The engine: sampling dynamics (``vialign.sampling``), typed configs (``vialign.config``) and the CLI
(``vialign.cli``). Model adapters live in the sibling package ``pipelines``, reward models in
``rewards``.
"""

__version__ = "0.1.0"
