// Kernel-time breakdown of any CUDA process: preloaded (LD_PRELOAD), it asks CUPTI
// for an activity record of every kernel, memcpy and memset, sums their device time by name and
// prints the largest at exit, to $KTRACE_OUT (appended) or stderr, headed by $KTRACE_LABEL. It
// works the same for our binaries and for PyTorch, so both are broken down by one measure; the
// GPU machine has neither nsys nor, on every runtime, ncu.
//
// With KTRACE_BY_GRID=1 each kernel is also keyed by its grid size, which for elementwise
// kernels tells the tensors apart (candle launches one thread per element, 1024 per block).
//
// Built by benches/build_cuda_binaries.sh against CUPTI 13.0 (the record layouts are CUPTI's
// CUpti_ActivityKernel10 and friends of that version) and run with that libcupti by
// benches/gpu.sh when TRACE=1.
#include <cupti.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { MAX_NAMES = 4096, NAME_LEN = 160, PRINTED = 45, BUFFER_BYTES = 8 << 20 };

struct total {
  char name[NAME_LEN];
  unsigned long long ns, launches;
};

static struct total totals[MAX_NAMES];
static int names;
static unsigned long long first_start, last_end;
static int by_grid;

// Adds one record's duration to its name's total; past MAX_NAMES names, to the last one.
static void add(const char *name, unsigned long long start, unsigned long long end) {
  int i = 0;
  while (i < names && strcmp(totals[i].name, name) != 0) i++;
  if (i == names) {
    if (names == MAX_NAMES) {
      i = MAX_NAMES - 1;
    } else {
      names++;
      snprintf(totals[i].name, NAME_LEN, "%s", name);
    }
  }
  totals[i].ns += end - start;
  totals[i].launches++;
  if (!first_start || start < first_start) first_start = start;
  if (end > last_end) last_end = end;
}

static void CUPTIAPI buffer_requested(uint8_t **buffer, size_t *size, size_t *max_records) {
  *size = BUFFER_BYTES;
  *buffer = aligned_alloc(8, BUFFER_BYTES);
  *max_records = 0;
}

static void CUPTIAPI buffer_completed(CUcontext context, uint32_t stream, uint8_t *buffer,
                                      size_t size, size_t valid) {
  (void)context, (void)stream, (void)size;
  CUpti_Activity *record = NULL;
  while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
    switch (record->kind) {
      case CUPTI_ACTIVITY_KIND_KERNEL:
      case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL: {
        CUpti_ActivityKernel10 *kernel = (CUpti_ActivityKernel10 *)record;
        const char *name = kernel->name ? kernel->name : "?";
        if (by_grid) {
          char keyed[NAME_LEN];
          snprintf(keyed, sizeof keyed, "%.100s grid %dx%dx%d", name, kernel->gridX,
                   kernel->gridY, kernel->gridZ);
          add(keyed, kernel->start, kernel->end);
        } else {
          add(name, kernel->start, kernel->end);
        }
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMCPY: {
        CUpti_ActivityMemcpy6 *copy = (CUpti_ActivityMemcpy6 *)record;
        char name[48];
        // copyKind 1 is host to device (the weights' upload), 8 device to device.
        snprintf(name, sizeof name, "[memcpy kind %d]", copy->copyKind);
        add(name, copy->start, copy->end);
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMSET: {
        CUpti_ActivityMemset4 *set = (CUpti_ActivityMemset4 *)record;
        add("[memset]", set->start, set->end);
        break;
      }
      default:
        break;
    }
  }
  free(buffer);
}

static int by_time(const void *a, const void *b) {
  unsigned long long x = ((const struct total *)a)->ns, y = ((const struct total *)b)->ns;
  return x < y ? 1 : x > y ? -1 : 0;
}

static void report(void) {
  cuptiActivityFlushAll(1);
  unsigned long long ns = 0, launches = 0;
  for (int i = 0; i < names; i++) ns += totals[i].ns, launches += totals[i].launches;
  // Child processes inherit the preload (nvidia-smi, for one) and launch nothing: no report.
  if (!launches) return;
  const char *path = getenv("KTRACE_OUT"), *label = getenv("KTRACE_LABEL");
  FILE *out = path ? fopen(path, "a") : NULL;
  if (!out) out = stderr;
  qsort(totals, names, sizeof totals[0], by_time);
  fprintf(out, "== %s: %llu launches, %.1f ms of device time, %.1f ms from first start to last end\n",
          label ? label : "kernel trace", launches, ns / 1e6, (last_end - first_start) / 1e6);
  for (int i = 0; i < names && i < PRINTED; i++)
    fprintf(out, "%9.2f ms %5.1f%% %7llu  %.150s\n", totals[i].ns / 1e6, 100.0 * totals[i].ns / ns,
            totals[i].launches, totals[i].name);
  if (out != stderr) fclose(out);
}

__attribute__((constructor)) static void start(void) {
  if (cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed) != CUPTI_SUCCESS) {
    fprintf(stderr, "kernel_trace: CUPTI refused the activity callbacks; no trace\n");
    return;
  }
  const char *grid = getenv("KTRACE_BY_GRID");
  by_grid = grid && grid[0] == '1';
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET);
  atexit(report);
}
