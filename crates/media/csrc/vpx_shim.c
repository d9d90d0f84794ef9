/* Thin C layer over libvpx's VP9 encoder and decoder.
 *
 * Why C and not Rust FFI declarations: libvpx's configuration structs (vpx_codec_enc_cfg_t,
 * vpx_image_t) are large and version-dependent; compiling this file against the installed headers
 * lets the C compiler lay them out, so the Rust side only sees plain integers and pointers. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vpx/vp8cx.h>
#include <vpx/vp8dx.h>
#include <vpx/vpx_decoder.h>
#include <vpx/vpx_encoder.h>

typedef struct vg_vp9_enc {
  vpx_codec_ctx_t codec;
  vpx_image_t *image;
  vpx_codec_iter_t iter;
  int width, height;
} vg_vp9_enc;

static void vg_error(char *err, size_t err_len, const char *what, vpx_codec_ctx_t *codec) {
  if (!err || err_len == 0) return;
  const char *detail = codec ? vpx_codec_error_detail(codec) : NULL;
  snprintf(err, err_len, "%s: %s%s%s", what, codec ? vpx_codec_error(codec) : "failed",
           detail ? " - " : "", detail ? detail : "");
}

static int vg_log2_tile_columns(int width) {
  /* VP9 tiles must be at least 256 pixels wide; more tiles let more threads work. */
  int log2 = 0;
  while (log2 < 6 && (width >> (log2 + 1)) >= 256) log2++;
  return log2;
}

vg_vp9_enc *vg_vp9_enc_open(int width, int height, int fps_num, int fps_den, int threads,
                            int cq_level, int cpu_used, int keyframe_interval, char *err,
                            size_t err_len) {
  vpx_codec_enc_cfg_t cfg;
  vpx_codec_iface_t *iface = vpx_codec_vp9_cx();
  if (vpx_codec_enc_config_default(iface, &cfg, 0) != VPX_CODEC_OK) {
    vg_error(err, err_len, "vpx_codec_enc_config_default", NULL);
    return NULL;
  }
  cfg.g_w = (unsigned)width;
  cfg.g_h = (unsigned)height;
  cfg.g_timebase.num = fps_den;
  cfg.g_timebase.den = fps_num;
  cfg.g_threads = (unsigned)threads;
  cfg.g_pass = VPX_RC_ONE_PASS;
  cfg.rc_end_usage = VPX_Q;
  cfg.rc_min_quantizer = 0;
  cfg.rc_max_quantizer = 63;
  cfg.kf_mode = VPX_KF_AUTO;
  cfg.kf_min_dist = 0;
  cfg.kf_max_dist = (unsigned)keyframe_interval;
  /* Frame dropping would break exact frame accounting. */
  cfg.rc_dropframe_thresh = 0;

  vg_vp9_enc *enc = calloc(1, sizeof(vg_vp9_enc));
  if (!enc) {
    vg_error(err, err_len, "out of memory", NULL);
    return NULL;
  }
  if (vpx_codec_enc_init(&enc->codec, iface, &cfg, 0) != VPX_CODEC_OK) {
    vg_error(err, err_len, "vpx_codec_enc_init", &enc->codec);
    free(enc);
    return NULL;
  }
  int ok = 1;
  ok &= vpx_codec_control(&enc->codec, VP8E_SET_CPUUSED, cpu_used) == VPX_CODEC_OK;
  ok &= vpx_codec_control(&enc->codec, VP8E_SET_CQ_LEVEL, (unsigned)cq_level) == VPX_CODEC_OK;
  ok &= vpx_codec_control(&enc->codec, VP9E_SET_ROW_MT, 1u) == VPX_CODEC_OK;
  ok &= vpx_codec_control(&enc->codec, VP9E_SET_TILE_COLUMNS, vg_log2_tile_columns(width)) ==
        VPX_CODEC_OK;
  ok &= vpx_codec_control(&enc->codec, VP8E_SET_ENABLEAUTOALTREF, 1u) == VPX_CODEC_OK;
  ok &= vpx_codec_control(&enc->codec, VP9E_SET_COLOR_SPACE, (int)VPX_CS_BT_709) == VPX_CODEC_OK;
  ok &= vpx_codec_control(&enc->codec, VP9E_SET_COLOR_RANGE, (int)VPX_CR_STUDIO_RANGE) ==
        VPX_CODEC_OK;
  if (!ok) {
    vg_error(err, err_len, "vpx_codec_control", &enc->codec);
    vpx_codec_destroy(&enc->codec);
    free(enc);
    return NULL;
  }
  enc->image = vpx_img_alloc(NULL, VPX_IMG_FMT_I420, (unsigned)width, (unsigned)height, 32);
  if (!enc->image) {
    vg_error(err, err_len, "vpx_img_alloc", NULL);
    vpx_codec_destroy(&enc->codec);
    free(enc);
    return NULL;
  }
  enc->width = width;
  enc->height = height;
  return enc;
}

static void vg_copy_plane(uint8_t *dst, int dst_stride, const uint8_t *src, int src_stride,
                          int width, int height) {
  for (int row = 0; row < height; row++) {
    memcpy(dst + (size_t)row * dst_stride, src + (size_t)row * src_stride, (size_t)width);
  }
}

/* Feeds one I420 frame (or, with y == NULL, flushes the encoder). Afterwards, collect the
 * packets with vg_vp9_enc_next_packet until it returns 0. Returns 0 on success. */
int vg_vp9_enc_encode(vg_vp9_enc *enc, const uint8_t *y, const uint8_t *u, const uint8_t *v,
                      int y_stride, int uv_stride, int64_t pts, char *err, size_t err_len) {
  vpx_image_t *image = NULL;
  if (y) {
    int chroma_w = (enc->width + 1) / 2, chroma_h = (enc->height + 1) / 2;
    vg_copy_plane(enc->image->planes[VPX_PLANE_Y], enc->image->stride[VPX_PLANE_Y], y, y_stride,
                  enc->width, enc->height);
    vg_copy_plane(enc->image->planes[VPX_PLANE_U], enc->image->stride[VPX_PLANE_U], u, uv_stride,
                  chroma_w, chroma_h);
    vg_copy_plane(enc->image->planes[VPX_PLANE_V], enc->image->stride[VPX_PLANE_V], v, uv_stride,
                  chroma_w, chroma_h);
    image = enc->image;
  }
  enc->iter = NULL;
  if (vpx_codec_encode(&enc->codec, image, pts, 1, 0, VPX_DL_GOOD_QUALITY) != VPX_CODEC_OK) {
    vg_error(err, err_len, "vpx_codec_encode", &enc->codec);
    return -1;
  }
  return 0;
}

/* Next compressed packet from the last vg_vp9_enc_encode call: 1 with data, len, pts and flags
 * set, or 0 when there are no more. flags bit 0: keyframe, bit 1: invisible frame. */
int vg_vp9_enc_next_packet(vg_vp9_enc *enc, const uint8_t **data, size_t *len, int64_t *pts,
                           int *flags) {
  const vpx_codec_cx_pkt_t *pkt;
  while ((pkt = vpx_codec_get_cx_data(&enc->codec, &enc->iter)) != NULL) {
    if (pkt->kind != VPX_CODEC_CX_FRAME_PKT) continue;
    *data = (const uint8_t *)pkt->data.frame.buf;
    *len = pkt->data.frame.sz;
    *pts = pkt->data.frame.pts;
    *flags = ((pkt->data.frame.flags & VPX_FRAME_IS_KEY) ? 1 : 0) |
             ((pkt->data.frame.flags & VPX_FRAME_IS_INVISIBLE) ? 2 : 0);
    return 1;
  }
  return 0;
}

void vg_vp9_enc_close(vg_vp9_enc *enc) {
  if (!enc) return;
  vpx_img_free(enc->image);
  vpx_codec_destroy(&enc->codec);
  free(enc);
}

typedef struct vg_vp9_dec {
  vpx_codec_ctx_t codec;
  vpx_codec_iter_t iter;
} vg_vp9_dec;

vg_vp9_dec *vg_vp9_dec_open(int threads, char *err, size_t err_len) {
  vg_vp9_dec *dec = calloc(1, sizeof(vg_vp9_dec));
  if (!dec) {
    vg_error(err, err_len, "out of memory", NULL);
    return NULL;
  }
  vpx_codec_dec_cfg_t cfg = {0};
  cfg.threads = (unsigned)threads;
  if (vpx_codec_dec_init(&dec->codec, vpx_codec_vp9_dx(), &cfg, 0) != VPX_CODEC_OK) {
    vg_error(err, err_len, "vpx_codec_dec_init", &dec->codec);
    free(dec);
    return NULL;
  }
  return dec;
}

/* Decodes one packet (data == NULL flushes). Collect pictures with vg_vp9_dec_next_frame. */
int vg_vp9_dec_decode(vg_vp9_dec *dec, const uint8_t *data, size_t len, char *err,
                      size_t err_len) {
  dec->iter = NULL;
  if (vpx_codec_decode(&dec->codec, data, (unsigned)len, NULL, 0) != VPX_CODEC_OK) {
    vg_error(err, err_len, "vpx_codec_decode", &dec->codec);
    return -1;
  }
  return 0;
}

/* Next decoded picture: 1 with planes set (8-bit I420 only), 0 when none is left, -1 when the
 * picture is in a format this layer does not convert (high bit depth or non-4:2:0). */
int vg_vp9_dec_next_frame(vg_vp9_dec *dec, const uint8_t **y, const uint8_t **u,
                          const uint8_t **v, int *y_stride, int *uv_stride, int *width,
                          int *height) {
  vpx_image_t *img = vpx_codec_get_frame(&dec->codec, &dec->iter);
  if (!img) return 0;
  if (img->fmt != VPX_IMG_FMT_I420) return -1;
  *y = img->planes[VPX_PLANE_Y];
  *u = img->planes[VPX_PLANE_U];
  *v = img->planes[VPX_PLANE_V];
  *y_stride = img->stride[VPX_PLANE_Y];
  *uv_stride = img->stride[VPX_PLANE_U];
  *width = (int)img->d_w;
  *height = (int)img->d_h;
  return 1;
}

void vg_vp9_dec_close(vg_vp9_dec *dec) {
  if (!dec) return;
  vpx_codec_destroy(&dec->codec);
  free(dec);
}
