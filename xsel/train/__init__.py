"""The workstation side of xsel: everything that needs the ``train`` extra (PyTorch, ONNX, matplotlib).

Training (``selector``, ``encoder``, ``classifier``), the models they train (``medselect``, ``head``,
``pretext``), the PyTorch embedding runner (``inference``, ``ray_engine``), ``export`` and ``explain``.
Modules here import torch at the top. Nothing on the site path (``xsel.site``, ``xsel.bundle``,
``xsel.selection``, ``xsel.selectors``, ``xsel.store``, ``xsel.io``) imports this package; the CLI, the demo and
the plugin factories import it lazily, inside the function that needs it (a test blocks torch to prove it).
"""
