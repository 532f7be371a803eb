"""An OpenAI-compatible steering server: per-request steering, batched rows, streaming, conditions.

Modules: :mod:`~torsion.serve.app` (routes), :mod:`~torsion.serve.engine` (batched generation
with per-row steering), :mod:`~torsion.serve.steering` (named vectors and the ``steering``
spec), :mod:`~torsion.serve.condition` (CAST conditions), :mod:`~torsion.serve.protocol`
(request fields) and :mod:`~torsion.serve.server` (start-up, uvicorn).

Example::

    state = build_state(lm, vectors=[("refusal", "runs/quick/vectors.safetensors", "md/resid")])
    with ServerThread(state) as server:
        client = OpenAI(base_url=server.url, api_key="none")
        client.chat.completions.create(model="any", messages=[...], extra_body={"steering": {
            "method": "flat", "vector": "refusal", "layers": [10], "strength": -4.0}})
"""

from torsion.serve.condition import Condition, fit_condition, load_condition, save_condition
from torsion.serve.server import ServerThread, build_state, run_server

__all__ = ["Condition", "ServerThread", "build_state", "fit_condition", "load_condition", "run_server",
           "save_condition"]
