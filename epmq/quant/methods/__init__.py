"""The quantizer registry, ``METHODS``: name -> :class:`~epmq.quant.methods.base.Quantizer`, in table order.

One file per method, each defining its one object:

========================  ===============  =====================  ========  ==============================
file / method             target           Hessian                rounding  shown as
========================  ===============  =====================  ========  ==============================
``rtn``                   W_m              --                     RTN       RTN
``gptq``                  W_m              pooled X X^T           GPTQ      GPTQ (the Δ baseline)
``epmq``                  W* (E-PMQ)       H (E-PMQ)              GPTQ      E-PMQ (the headline)
``epmq_unrounded``        W* (E-PMQ)       --                     none      ablation, never ranked
``gptq_corrected``        W* (E-PMQ)       pooled X X^T           GPTQ      ablation
``gptq_epmq_hessian``     W_m              H (E-PMQ)              GPTQ      ablation
========================  ===============  =====================  ========  ==============================

Adding a quantizer: a file here defining one :class:`Quantizer` (or a subclass overriding ``plan`` /
``round_sites``), its line in :data:`_ALL` below, its name in the config schema's ``quantize.methods`` enum
(``tests/test_quantizers.py`` keeps the two equal) and a test. Everything else -- the engine, the config's
knob selection, the workflow's inputs, the CLI, the report's names, order, marks and colours -- reads this
registry. Importing it imports no torch.
"""

from __future__ import annotations

from epmq.errors import EPMQError
from epmq.quant.methods.base import Quantizer, QuantMethod
from epmq.quant.methods.epmq import EPMQ
from epmq.quant.methods.epmq_unrounded import EPMQ_UNROUNDED
from epmq.quant.methods.gptq import GPTQ
from epmq.quant.methods.gptq_corrected import GPTQ_CORRECTED
from epmq.quant.methods.gptq_epmq_hessian import GPTQ_EPMQ_HESSIAN
from epmq.quant.methods.rtn import RTN

__all__ = ["METHODS", "Quantizer", "QuantMethod", "registry"]

_ALL = (RTN, GPTQ, EPMQ, EPMQ_UNROUNDED, GPTQ_CORRECTED, GPTQ_EPMQ_HESSIAN)


def registry(quantizers) -> dict[str, Quantizer]:
    """name -> quantizer, ordered by ``order``; a one-line error on a repeated name, order or colour, or on more
    than one baseline or headline."""
    out: dict[str, Quantizer] = {}
    for q in sorted(quantizers, key=lambda q: q.order):
        for attr in ("name", "order", "colour"):
            value = getattr(q, attr)
            clash = [o.name for o in out.values() if value != "" and getattr(o, attr) == value]
            if clash:
                raise EPMQError(f"quantizer {q.name!r}: {attr} {value!r} is already taken by {clash[0]!r}")
        out[q.name] = q
    for flag in ("baseline", "headline"):
        marked = [q.name for q in out.values() if getattr(q, flag)]
        if len(marked) > 1:
            raise EPMQError(f"quantizers {marked}: at most one may be the {flag}")
    return out


METHODS: dict[str, Quantizer] = registry(_ALL)
