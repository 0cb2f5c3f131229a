def is_hf(path):
    return False
def read(path):
    raise NotImplementedError
