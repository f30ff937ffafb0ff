"""`python -m fineserve.serving --model_name NAME --model_dir DIR`: KServe's custom predictor."""

from fineserve.serving.entrypoint import main

if __name__ == "__main__":
    main()
