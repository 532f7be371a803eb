"""Manifold (spline) steering: knots from behaviour bins, spline A per block, spline B over (t, layer).

methods.md, "Manifold (spline) steering". :mod:`torsion.manifold.knots` builds the knots,
:mod:`torsion.manifold.fit` the splines and the leave-one-block-out table,
:mod:`torsion.manifold.file` the ``manifold.safetensors`` format,
:mod:`torsion.manifold.coherence` the endpoint sweep and :mod:`torsion.manifold.build` the
run-directory entry point. The steering methods are :mod:`torsion.steering.spline_a` and
:mod:`torsion.steering.spline_b`.
"""
