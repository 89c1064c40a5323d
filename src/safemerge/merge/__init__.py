"""One weight's guarded merge: the float32 arithmetic, its error bounds, the finiteness
guard, the blocked engine and the exact-unfuse correction.

Bottom to top: ``numerics`` (dtype facts), ``bounds`` (forward error bounds), ``adapter``
(:class:`LoraAdapter`), ``view`` (a layer seen as a matrix), ``guard`` (the one
finiteness check), ``correction`` (the compact record that undoes a cast exactly),
``engine`` (the blocked fuse/unfuse of one matrix), ``request`` (adapters and their
coefficients for one layer), ``record`` (:class:`FuseRecord`), ``reference`` (the float64
result a fuse must stay near), ``headroom`` (a cheap proof that the guard cannot refuse),
``bound_check`` (every element of a fused weight against its bound), ``layer_check``
(a layer's check: what it takes before the fuse, the comparison after). See
``docs/design.md``, "The arithmetic" and "Exact unfuse".
"""
