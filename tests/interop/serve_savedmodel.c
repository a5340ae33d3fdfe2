/* Serves a SavedModel through TensorFlow's C API alone, as Triton's TensorFlow backend or TF Serving do: the
 * process runs no Python until the HpsLookup op library starts its own (test_serve_without_python.py builds and
 * runs this).
 *
 *   serve_savedmodel OP_LIBRARY SAVEDMODEL_DIR OUT_PREFIX INPUT... OUTPUT...
 *     INPUT  = in:<op>:<index>:<int64|int32|float>:<dims, comma-separated>:<raw file>
 *     OUTPUT = out:<op>:<index>   written as raw float32 to OUT_PREFIX<k>.bin (k = 0, 1, ... in argument order)
 *
 * Prints "ok" and each output's shape; exits 1 with TF's message on any failure.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tensorflow/c/c_api.h"

#define MAX_IO 16

static void fail(const char* what, const TF_Status* status) {
  fprintf(stderr, "%s: %s\n", what, status != NULL ? TF_Message(status) : "");
  exit(1);
}

static void* read_file(const char* path, size_t bytes) {
  FILE* f = fopen(path, "rb");
  if (f == NULL) fail(path, NULL);
  void* data = malloc(bytes > 0 ? bytes : 1);
  if (bytes > 0 && fread(data, 1, bytes, f) != bytes) fail("short input file", NULL);
  fclose(f);
  return data;
}

static TF_Operation* operation(TF_Graph* graph, const char* name) {
  TF_Operation* op = TF_GraphOperationByName(graph, name);
  if (op == NULL) {
    fprintf(stderr, "no operation %s in the graph\n", name);
    exit(1);
  }
  return op;
}

/* in:<op>:<index>:<dtype>:<dims>:<file> */
static TF_Tensor* parse_input(TF_Graph* graph, char* spec, TF_Output* port) {
  strtok(spec, ":");
  const char* op = strtok(NULL, ":");
  const int index = atoi(strtok(NULL, ":"));
  const char* dtype = strtok(NULL, ":");
  char* dims_text = strtok(NULL, ":");
  const char* file = strtok(NULL, ":");
  if (op == NULL || dtype == NULL || dims_text == NULL || file == NULL) fail("bad input spec", NULL);
  int64_t dims[8];
  int ndim = 0;
  size_t count = 1;
  for (char* d = strtok(dims_text, ","); d != NULL && ndim < 8; d = strtok(NULL, ",")) {
    dims[ndim] = atoll(d);
    count *= (size_t)dims[ndim++];
  }
  TF_DataType type = TF_FLOAT;
  size_t width = 4;
  if (strcmp(dtype, "int64") == 0) {
    type = TF_INT64;
    width = 8;
  } else if (strcmp(dtype, "int32") == 0) {
    type = TF_INT32;
  }
  TF_Tensor* tensor = TF_AllocateTensor(type, dims, ndim, count * width);
  void* data = read_file(file, count * width);
  memcpy(TF_TensorData(tensor), data, count * width);
  free(data);
  port->oper = operation(graph, op);
  port->index = index;
  return tensor;
}

int main(int argc, char** argv) {
  if (argc < 5) {
    fprintf(stderr, "usage: %s OP_LIBRARY SAVEDMODEL_DIR OUT_PREFIX in:... out:...\n", argv[0]);
    return 2;
  }
  TF_Status* status = TF_NewStatus();
  TF_Library* library = TF_LoadLibrary(argv[1], status);
  if (TF_GetCode(status) != TF_OK) fail("TF_LoadLibrary", status);

  TF_Graph* graph = TF_NewGraph();
  TF_SessionOptions* options = TF_NewSessionOptions();
  const char* tags[] = {"serve"};
  TF_Session* session = TF_LoadSessionFromSavedModel(options, NULL, argv[2], tags, 1, graph, NULL, status);
  if (TF_GetCode(status) != TF_OK) fail("TF_LoadSessionFromSavedModel", status);

  TF_Output inputs[MAX_IO], outputs[MAX_IO];
  TF_Tensor* input_values[MAX_IO];
  TF_Tensor* output_values[MAX_IO];
  int n_in = 0, n_out = 0;
  for (int a = 4; a < argc; ++a) {
    if (strncmp(argv[a], "in:", 3) == 0 && n_in < MAX_IO) {
      input_values[n_in] = parse_input(graph, argv[a], &inputs[n_in]);
      ++n_in;
    } else if (strncmp(argv[a], "out:", 4) == 0 && n_out < MAX_IO) {
      strtok(argv[a], ":");
      const char* op = strtok(NULL, ":");
      outputs[n_out].oper = operation(graph, op);
      outputs[n_out].index = atoi(strtok(NULL, ":"));
      ++n_out;
    } else {
      fprintf(stderr, "bad argument %s\n", argv[a]);
      return 2;
    }
  }

  TF_SessionRun(session, NULL, inputs, input_values, n_in, outputs, output_values, n_out, NULL, 0, NULL, status);
  if (TF_GetCode(status) != TF_OK) fail("TF_SessionRun", status);

  printf("ok\n");
  for (int k = 0; k < n_out; ++k) {
    if (TF_TensorType(output_values[k]) != TF_FLOAT) fail("an output is not float32", NULL);
    char path[4096];
    snprintf(path, sizeof path, "%s%d.bin", argv[3], k);
    FILE* f = fopen(path, "wb");
    if (f == NULL) fail(path, NULL);
    fwrite(TF_TensorData(output_values[k]), 1, TF_TensorByteSize(output_values[k]), f);
    fclose(f);
    printf("output %d:", k);
    for (int d = 0; d < TF_NumDims(output_values[k]); ++d) printf(" %lld", (long long)TF_Dim(output_values[k], d));
    printf("\n");
    TF_DeleteTensor(output_values[k]);
  }
  for (int k = 0; k < n_in; ++k) TF_DeleteTensor(input_values[k]);
  TF_CloseSession(session, status);
  TF_DeleteSession(session, status);
  TF_DeleteSessionOptions(options);
  TF_DeleteGraph(graph);
  TF_DeleteLibraryHandle(library);
  TF_DeleteStatus(status);
  return 0;
}
