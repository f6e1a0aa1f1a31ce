"""Token strings and ids shared by the model, the processing and the data pipeline."""

# Label value ignored by the LM loss (PyTorch's cross-entropy default, as in LLaVA).
IGNORE_INDEX = -100

# The placeholder users write in a conversation ("<image>\nWhat is ..."). In model inputs it is
# expanded to one image token per visual feature (the HF Llava input convention).
IMAGE_TOKEN = "<image>"

# DPN's router token: appended to the end of every human turn of multimodal samples; the router reads
# the hidden state at its position(s).
ROUTER_TOKEN = "<ROUTER>"

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
