"""Curvature of the training loss at a checkpoint: Hessian eigenvalues, trace and Keskar's ε-sharpness.

Data flow, one module per quantity:

- :mod:`~gradlab.curvature.hvp`: the training loss over a fixed sample of N examples on a functional copy of the
  model, its gradient and exact Hessian-vector products (double backward, chunked over examples);
- :mod:`~gradlab.curvature.lanczos`: λ_max and the top-k eigenvalues by Lanczos (``scipy.sparse.linalg.eigsh``),
  with residuals ‖Hv − λv‖ and the HVP count; plain power iteration for comparison;
- :mod:`~gradlab.curvature.hutchinson`: tr H by Hutchinson's estimator with a standard error;
- :mod:`~gradlab.curvature.eps_sharpness`: Keskar et al.'s Metric 2.1 by L-BFGS-B, full space or random subspace;
- :mod:`~gradlab.curvature.minibatch`: λ_max of mini-batch Hessians vs the batch size and its full-batch limit;
- :mod:`~gradlab.curvature.interpolation`: Keskar's parametric plot between two solutions;
- :mod:`~gradlab.curvature.run`: orchestration into a resumable ``sharpness`` zarr store.

The statistics on the store (power laws, Spearman ρ, edge-of-stability ratio) live in
:mod:`gradlab.analysis.curvature`, which never imports torch.
"""
