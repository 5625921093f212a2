"""Running a trained model on new images: the input list, its loader and the prediction writers."""
