"""twotower: block-diffusion language models built from pretrained NemotronH checkpoints."""

__version__ = "0.1.0"


def load(model: str | None = None, *, device: str | None = None, dtype: str = "auto", denoiser: bool = True,
         context_device: str | None = None, denoiser_device: str | None = None, threads: int | None = None,
         compile: bool = False, cuda_graphs: bool = False):
    """A model ready to sample, as the commands load it: `model` is a checkpoint folder, hub id (in the
    cache) or alias (default: the embedded tiny model); `denoiser=False` loads the context tower and its
    head only (`mode="ar"`). Returns a `runtime.Runtime`: `.generate(prompt, ...)` for text, `.backend`
    for the sampler (`twotower_cli.sampler.generate` yields its events), `.tokenizer`, `.cfg`.

        import twotower_cli
        rt = twotower_cli.load()
        print(rt.generate("ROMEO.", max_new_tokens=64).text)
    """
    from twotower_cli.runtime import open_runtime  # torch is imported here, not when the CLI starts

    return open_runtime(model, need_denoiser=denoiser, device=device, dtype=dtype, context_device=context_device,
                        denoiser_device=denoiser_device, compile=compile, threads=threads, cuda_graphs=cuda_graphs)
