"""Run-level code, above the method's parts (loader, models, modules), which never import it:

    utils/engine/   one engine per step (crop, mediator, front door, fine-tune, test) and the
                    training loop they share
    utils/runtime/  infrastructure: options, processes, artifact paths and records, I/O, pictures
    utils/tools/    offline tools: the embedded demo, the benchmark and the official formulation
                    it compares against (never imported by a step)
"""
