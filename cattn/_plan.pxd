# Compiled, Plan is an extension type: its fields are C struct members, read and written
# without a dictionary lookup (a tiny call reads them a hundred times). See _plan.py.
cdef class Plan:
    cdef public object query, key, value, narrow, dtype, user_out, out
    cdef public object L, S, E, Ev, longest_keys, q_rs, k_rs, v_rs, paged, tasks, table
    cdef public object is_causal, enable_gqa, return_lse, return_weights, scale, softcap
    cdef public object win_left, win_right, num_threads, block_sizes, isa, block_q, block_k
    cdef public object mask, mask_kind, mask_rs, mask_cs, keep, sinks, out_rs, out_cs
    cdef public object lse, weights, kv_storage, alibi, return_key_mass, mass_shape, key_mass
    cdef public object distance_bias, mass_group

cpdef choose_blocks(Plan plan)
cpdef launch(Plan plan)
