"""The synthetic corpus behind `dpn synth` and the embedded demo: scenes (`scenes`), the questions and text
around them (`questions`), drawing (`rendering`), and the writer of the LLaVA-layout corpus with its
tokenizer (`corpus`)."""
