"""Run-level code, above the method's parts (loader, models, modules), which never import it. Its
layers point one way, each importing only those below it:

    utils/cli/      the entry points: the step scripts' main, `bash run`, torchrun
    utils/engine/   one engine per step, and the machinery they share (runner, status, loop, resume,
                    optim, trained models)
    utils/tools/    offline tools: the embedded demo, the benchmark and the official formulation
                    it compares against (never imported by a step)
    utils/runtime/  infrastructure: the step registry and option catalogue, configs, recipes,
                    processes, artifact paths and records, locks, downloads, I/O, pictures
"""
